"""The same engine on CUDA: greedy tokens equal HF transformers on the GPU (skipped without
a GPU; CI has none)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollserve import Engine

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("preset", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_decode_on_cuda_matches_hf_on_cuda(tiny_model_factory, preset: str) -> None:
    path = tiny_model_factory(preset)
    prompts = [[5 + i, 17, 42 + i, 99][: 2 + i % 3] * (1 + i) for i in range(16)]
    params = {"temperature": 0.0, "max_new_tokens": 32, "ignore_eos": True}
    with Engine(str(path), dtype="float32", device="cuda", max_total_tokens=8192) as engine:
        outputs = engine.generate(input_ids=prompts, sampling_params=params)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    for prompt, out in zip(prompts, outputs, strict=True):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out["output_ids"] == ref[0, len(prompt):].tolist()
