"""Greedy tokens and logprobs of the engine equal HF transformers on the same weights, on
the CPU and (when one is present; CI has none) on a CUDA GPU, the reference run on the same
device."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollserve import Engine
from rollserve.models.config import load_model_config

TINY_PRESETS = ("llama", "qwen2", "qwen3", "mistral")
DEVICES = (
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ]),
)
NEW_TOKENS = 64
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def _prompts(vocab: int) -> list[list[int]]:
    """16 prompts of different lengths (3 .. 93 tokens), some sharing prefixes."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(3, vocab, (100,), generator=gen).tolist()
    return [base[(i % 3) * 4 :][: 3 + 6 * i] for i in range(16)]


def _hf_reference(
    path, prompts: list[list[int]], device: str
) -> list[tuple[list[int], list[float]]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    refs = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
        ids = out.sequences[0, len(prompt) :].tolist()
        logprobs = [
            torch.log_softmax(step[0].float(), -1)[t].item()
            for step, t in zip(out.logits, ids, strict=True)
        ]
        refs.append((ids, logprobs))
    return refs


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=TINY_PRESETS)
def arch_case(request, tiny_model_factory, device: str):
    path = tiny_model_factory(request.param)
    prompts = _prompts(load_model_config(path).vocab_size)
    return path, prompts, _hf_reference(path, prompts, device)


def _assert_matches(outputs: list[dict], refs) -> None:
    for i, (out, (ids, logprobs)) in enumerate(zip(outputs, refs, strict=True)):
        assert out["output_ids"] == ids, f"prompt {i}: tokens differ from HF"
        got = [t[0] for t in out["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got, logprobs, strict=True)) < 1e-3


def test_batched_greedy_decode_matches_hf(arch_case, device: str) -> None:
    path, prompts, refs = arch_case
    with Engine(str(path), dtype="float32", device=device, max_total_tokens=8192) as engine:
        outputs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        assert engine.stats()["max_running"] == len(prompts)  # one continuous batch
    _assert_matches(outputs, refs)


def test_small_prefill_chunks_and_cache_hits_match_hf(arch_case, device: str) -> None:
    path, prompts, refs = arch_case
    with Engine(
        str(path), dtype="float32", device=device, max_total_tokens=8192, chunked_prefill_size=16
    ) as engine:
        first = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        second = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    _assert_matches(first, refs)
    _assert_matches(second, refs)
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in second)


def test_requests_arriving_while_others_decode_match_hf(arch_case, device: str) -> None:
    path, prompts, refs = arch_case
    outputs: list[dict | None] = [None] * len(prompts)
    with Engine(
        str(path), dtype="float32", device=device, max_total_tokens=8192, chunked_prefill_size=16
    ) as engine:

        def run(i: int) -> None:
            outputs[i] = engine.generate(
                input_ids=prompts[i], sampling_params=GREEDY, return_logprob=True
            )

        threads = []
        for i in range(len(prompts)):
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
            time.sleep(0.02)  # staggered: later requests join a batch that is decoding
        for t in threads:
            t.join()
    _assert_matches(outputs, refs)
