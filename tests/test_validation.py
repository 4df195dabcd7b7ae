"""Invalid requests and parameters raise ValueError naming the problem; the engine survives."""

from __future__ import annotations

import pytest

from rollserve import Engine, SamplingParams
from rollserve.engine.sampling_params import to_sglang_names


@pytest.fixture(scope="module")
def engine(llama_path):
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=2048,
                context_length=256) as e:
        yield e


@pytest.mark.parametrize(("params", "fragment"), [
    ({"temprature": 1.0}, "temprature"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "'n'"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"stop": [""]}, "stop"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"sampling_seed": 2**64}, "sampling_seed"),
])
def test_bad_sampling_params_name_the_parameter(params: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        SamplingParams.from_dict(params)


def test_openai_sampling_names_become_sglang_names() -> None:
    assert to_sglang_names({"max_tokens": 8, "seed": 3, "min_tokens": 1, "top_k": 5}) == {
        "max_new_tokens": 8, "sampling_seed": 3, "min_new_tokens": 1, "top_k": 5}
    assert to_sglang_names({"max_new_tokens": 8, "no_such": 1}) == {
        "max_new_tokens": 8, "no_such": 1}  # left for SamplingParams to refuse
    # OpenAI's two names for one parameter: the later in the request wins.
    assert to_sglang_names({"max_tokens": 8, "max_completion_tokens": 4}) == {
        "max_new_tokens": 4}


@pytest.mark.parametrize(("params", "message"), [
    ({"max_tokens": 8, "max_new_tokens": 4}, "pass max_tokens or max_new_tokens, not both"),
    ({"sampling_seed": 1, "seed": 2}, "pass seed or sampling_seed, not both"),
])
def test_an_openai_name_with_its_sglang_name_is_refused(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_sglang_names(params)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({}, "exactly one"),
    ({"prompt": "hi", "input_ids": [1, 2]}, "exactly one"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [1, "2"]}, "input_ids"),
    ({"input_ids": [1, 10**9]}, "outside the vocabulary"),
    ({"prompt": 5}, "text"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 300}}, "context length"),
    ({"input_ids": [[1, 2], [3]], "sampling_params": [{}]}, "sampling_params"),
    ({"input_ids": [1, 2], "logprob_start_len": -3}, "logprob_start_len"),
    ({"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [10**9]}}, "stop_token_ids"),
])
def test_bad_requests_raise_and_engine_keeps_serving(engine: Engine, kwargs: dict,
                                                     fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        engine.generate(**kwargs)
    out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    assert len(out["output_ids"]) <= 2


def test_no_max_new_tokens_means_up_to_the_context_length(engine: Engine) -> None:
    params = {"max_new_tokens": None, "ignore_eos": True, "temperature": 0.0}
    outputs = engine.generate(input_ids=[[1, 2, 3], list(range(1, 201))],
                              sampling_params=params)
    assert [len(o["output_ids"]) for o in outputs] == [256 - 3, 256 - 200]
    assert outputs[0]["meta_info"]["finish_reason"]["type"] == "length"


def test_request_that_cannot_fit_the_kv_pool_alone_is_refused(llama_path) -> None:
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=64) as small:
        with pytest.raises(ValueError, match="exceeds the KV pool"):
            small.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 100})
        unbounded = small.generate(input_ids=[1, 2, 3], sampling_params={
            "max_new_tokens": None, "ignore_eos": True})
        assert len(unbounded["output_ids"]) == 64 - 3


def test_unknown_engine_option_is_a_type_error(llama_path) -> None:
    with pytest.raises(TypeError, match="bogus"):
        Engine(str(llama_path), bogus=1)


def test_bad_engine_option_values_are_named(llama_path) -> None:
    with pytest.raises(ValueError, match="schedule_policy"):
        Engine(str(llama_path), schedule_policy="random")
    with pytest.raises(ValueError, match="dtype"):
        Engine(str(llama_path), dtype="int8")
