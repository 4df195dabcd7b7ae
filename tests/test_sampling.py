"""Sampling semantics: greedy equivalents, seeds, the empirical distribution, stops."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollserve import Engine

PROMPT = [11, 22, 33, 44, 55]


@pytest.fixture(scope="module")
def engine(llama_path):
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=16384) as e:
        yield e


def _ids(engine: Engine, **params) -> list[int]:
    params = {"max_new_tokens": 24, "ignore_eos": True, **params}
    return engine.generate(input_ids=PROMPT, sampling_params=params)["output_ids"]


def test_top_k_1_and_tiny_top_p_equal_greedy(engine: Engine) -> None:
    greedy = _ids(engine, temperature=0.0)
    assert _ids(engine, temperature=1.0, top_k=1) == greedy
    assert _ids(engine, temperature=1.0, top_p=1e-6) == greedy


def test_same_sampling_seed_reproduces_and_other_seeds_differ(engine: Engine) -> None:
    first = _ids(engine, temperature=1.0, sampling_seed=1234)
    # The same request again, now sharing the batch with unrelated sampled requests.
    batch = engine.generate(
        input_ids=[PROMPT, [7, 8, 9], PROMPT],
        sampling_params=[
            {"temperature": 1.0, "sampling_seed": 1234, "max_new_tokens": 24, "ignore_eos": True},
            {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True},
            {"temperature": 1.0, "sampling_seed": 99, "max_new_tokens": 24, "ignore_eos": True},
        ],
    )
    assert batch[0]["output_ids"] == first
    assert batch[2]["output_ids"] != first


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_frequencies_match_softmax_over_a_small_vocabulary(
    engine: Engine, llama_path, temperature: float
) -> None:
    """Restricted to the 8 likeliest tokens (top_k), the draws must follow
    softmax(logits / temperature) renormalised over those 8."""
    draws, k = 3000, 8
    out = engine.generate(input_ids=PROMPT, sampling_params={
        "temperature": temperature, "top_k": k, "max_new_tokens": 1, "n": draws})
    hf = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0, -1].double()
    top = logits.topk(k)
    probs = torch.softmax(top.values / temperature, -1)
    drawn = torch.tensor([o["output_ids"][0] for o in out])
    assert set(drawn.tolist()) <= set(top.indices.tolist())
    empirical = torch.stack([(drawn == t).double().mean() for t in top.indices])
    # Sampling noise: each frequency within 4 standard errors, total variation small.
    stderr = (probs * (1 - probs) / draws).sqrt()
    assert ((empirical - probs).abs() <= 4 * stderr + 1e-3).all(), (empirical, probs)
    assert 0.5 * (empirical - probs).abs().sum() < 0.05


def test_stop_string_split_across_tokens_is_caught_and_trimmed(engine: Engine) -> None:
    free = engine.generate(input_ids=PROMPT, sampling_params={"temperature": 0.0,
                           "max_new_tokens": 40, "ignore_eos": True})
    text, ids = free["text"], free["output_ids"]
    tokenizer = engine.tokenizer
    # A stop string that starts inside one token's text and ends inside a later one.
    piece_ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    boundary = next(e for e in piece_ends[3:] if 2 <= e < len(text) - 2)
    stop = text[boundary - 2 : boundary + 2]
    assert stop.strip(), "need a visible stop string"
    cut = text.find(stop)
    stopped = engine.generate(input_ids=PROMPT, sampling_params={
        "temperature": 0.0, "max_new_tokens": 40, "ignore_eos": True, "stop": stop})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stopped["text"] == text[:cut]
    kept = engine.generate(input_ids=PROMPT, sampling_params={
        "temperature": 0.0, "max_new_tokens": 40, "ignore_eos": True, "stop": stop,
        "no_stop_trim": True})
    assert kept["text"] == text[: cut + len(stop)]


def test_stop_token_ids_and_max_new_tokens_finish_reasons(engine: Engine) -> None:
    ids = _ids(engine, temperature=0.0)
    out = engine.generate(input_ids=PROMPT, sampling_params={
        "temperature": 0.0, "max_new_tokens": 24, "stop_token_ids": [ids[5]], "ignore_eos": True})
    first = ids.index(ids[5])
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[5]}
    out = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 3})
    assert out["meta_info"]["finish_reason"]["type"] in ("length", "stop")


def test_min_new_tokens_holds_back_stop_tokens(engine: Engine) -> None:
    ids = _ids(engine, temperature=0.0)
    out = engine.generate(input_ids=PROMPT, sampling_params={
        "temperature": 0.0, "max_new_tokens": 24, "stop_token_ids": [ids[0]],
        "min_new_tokens": 4, "ignore_eos": True})
    assert len(out["output_ids"]) >= 4
    assert ids[0] not in out["output_ids"][:4]


def _repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_penalties_reduce_repetition(engine: Engine) -> None:
    greedy = _ids(engine, temperature=0.0)
    assert _repeats(greedy) > 0, "the tiny model's greedy output should repeat itself"
    for penalty in ({"repetition_penalty": 2.0},
                    {"frequency_penalty": 2.0, "presence_penalty": 2.0}):
        assert _repeats(_ids(engine, temperature=0.0, **penalty)) < _repeats(greedy), penalty


def test_n_samples_share_the_prompt_cache(engine: Engine) -> None:
    prompt = list(range(100, 160))
    outs = engine.generate(input_ids=prompt, sampling_params={
        "temperature": 1.0, "max_new_tokens": 8, "n": 4, "sampling_seed": 5})
    assert len(outs) == 4
    assert [o["meta_info"]["cached_tokens"] for o in outs][1:] == [len(prompt) - 1] * 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_sampler_reads_model_dtype_logits_with_the_tokens_of_their_float32_copy() -> None:
    from rollserve.engine.request import Req
    from rollserve.engine.sampler import sample
    from rollserve.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen).to(torch.bfloat16)
    untouched = logits.clone()
    top = [int(row.float().argmax()) for row in logits]
    params = [
        {"temperature": 0.0},
        {"temperature": 0.0, "repetition_penalty": 2.0},  # the prompt token is the top one
        {"temperature": 0.0, "min_new_tokens": 2, "stop_token_ids": [top[2]]},
    ]
    reqs = [Req(f"r{i}", [top[i]], SamplingParams.from_dict(p), None, lambda _req: None)
            for i, p in enumerate(params)]
    got = sample(logits, reqs, (), gen).tolist()
    assert got == sample(logits.float(), reqs, (), gen).tolist()
    assert got[0] == top[0] and got[1] != top[1] and got[2] != top[2]
    assert torch.equal(logits, untouched)  # penalties and bans work on a float32 copy


@pytest.mark.parametrize("native_path", [False, True])
def test_sampler_leaves_logits_untouched_and_draws_the_same_tokens_on_both_paths(
    native_path: bool,
) -> None:
    """The native kernel and the PyTorch path take the same uniform per row through the same
    inverse CDF: equal tokens but where a draw falls within rounding of a boundary."""
    from rollserve.engine.request import Req
    from rollserve.engine.sampler import sample
    from rollserve.engine.sampling_params import SamplingParams
    from rollserve.kernels.sampling import make_native_sampling

    native = make_native_sampling(torch.device("cpu"))
    if native_path and native is None:
        pytest.skip("no native kernels here (neither AVX2 nor AVX-512, or no C compiler)")
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    untouched = logits.clone()
    params = [{"temperature": 0.0}, {"temperature": 0.7}, {}] * 21 + [{"temperature": 0.0}]
    reqs = [Req(f"r{i}", [1], SamplingParams.from_dict(p), None, lambda _req: None)
            for i, p in enumerate(params)]

    def draw(use_native: bool) -> list[int]:
        generator = torch.Generator().manual_seed(7)
        return sample(logits, reqs, (), generator, native if use_native else None).tolist()

    reference = draw(False)
    assert torch.equal(logits, untouched)
    assert reference[::3] == logits[::3].float().argmax(-1).tolist()  # greedy rows
    if native_path:
        assert sum(a == b for a, b in zip(draw(True), reference, strict=True)) >= 63
        assert torch.equal(logits, untouched)
