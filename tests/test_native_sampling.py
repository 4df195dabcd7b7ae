"""The native sampling kernel: the first maximum for greedy rows, and draws that follow
softmax(logits / temperature) for the others, never picking a banned (-inf) token; for
each instruction set this CPU runs (native_isas.ISAS)."""

from __future__ import annotations

import pytest
import torch
from native_isas import ISAS

from rollserve.kernels.sampling import NativeSampling


@pytest.fixture(scope="module", params=ISAS)
def native(request) -> NativeSampling:
    return NativeSampling(request.param)


def _grid_draws(count: int) -> torch.Tensor:
    return (torch.arange(count, dtype=torch.float64) + 0.5) / count  # evenly spread in (0, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_rows_take_the_first_maximum(native, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 1003, generator=gen).to(dtype)  # 1003: a partial last block
    logits[1, [5, 700]] = 50.0  # a tie: the first one wins, as torch's max gives
    logits[2, -1] = 50.0  # the maximum in the tail block
    logits[3, :] = float("-inf")
    logits[3, 17] = 1.0
    ids = native(logits, torch.zeros(9), torch.full((9,), 0.5, dtype=torch.float64))
    assert ids.tolist() == logits.max(dim=-1).indices.tolist()
    assert ids[1] == 5 and ids[2] == 1002 and ids[3] == 17


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_follow_the_tempered_softmax(native, dtype, temperature) -> None:
    """Evenly spread draws through the inverse CDF reproduce every token's probability to
    within one draw's share (plus float32 rounding of the weights)."""
    gen = torch.Generator().manual_seed(1)
    vocab, draws = 61, 20000
    row = (torch.randn(vocab, generator=gen) * 2).to(dtype)
    logits = row.expand(draws, vocab)
    ids = native(logits, torch.full((draws,), temperature), _grid_draws(draws))
    expected = torch.softmax(row.double() / temperature, -1)
    frequencies = torch.bincount(ids, minlength=vocab).double() / draws
    assert (frequencies - expected).abs().max() <= 1.0 / draws + 1e-5


def test_banned_tokens_are_never_drawn(native) -> None:
    vocab, draws = 40, 4000
    logits = torch.zeros(draws, vocab)
    banned = [0, 1, 17, 38, 39]  # the ends of the CDF included
    logits[:, banned] = float("-inf")
    extremes = torch.tensor([1e-12, 1.0], dtype=torch.float64)
    ids = native(logits, torch.ones(draws), torch.cat([_grid_draws(draws - 2), extremes]))
    assert not set(ids.tolist()) & set(banned)
    assert len(set(ids.tolist())) == vocab - len(banned)


def test_native_sampling_refuses_what_it_was_not_built_for(native) -> None:
    with pytest.raises(ValueError, match="logits"):
        native(torch.zeros(2, 8, dtype=torch.float16), torch.ones(2),
               torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperatures and draws"):
        native(torch.zeros(2, 8), torch.ones(3), torch.ones(2, dtype=torch.float64))
