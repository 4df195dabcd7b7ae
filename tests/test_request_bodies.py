"""Request bodies of every shape, over the app in process: whatever a client sends, a
malformed body answers 4xx with `{"error": {"message": ...}}` naming the problem, never a
500, and the server keeps serving."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from rollserve import Engine, ServerArgs
from rollserve.server.app import build_app

DEEP_LIST = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
HI = [{"role": "user", "content": "hi"}]
ONE_TOKEN = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}
# Endpoints that read a JSON object and require one.
OBJECT_ROUTES = ["/generate", "/v1/chat/completions", "/v1/completions", "/tokenize",
                 "/detokenize", "/abort_request"]
# Endpoints that take an absent body as an empty object.
CONTROL_ROUTES = ["/update_weights_from_disk", "/init_weights_update_group",
                  "/update_weights_from_distributed", "/update_weights_from_tensor",
                  "/destroy_weights_update_group", "/get_weights_by_name",
                  "/pause_generation", "/continue_generation"]


@pytest.fixture(scope="module")
def client(llama_path):
    with Engine(str(llama_path), device="cpu", dtype="float32", max_total_tokens=1024) as engine:
        app = build_app(engine, ServerArgs(model_path=str(llama_path), device="cpu",
                                           dtype="float32"))
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client


def send(client: TestClient, path: str, body: bytes | dict):
    if isinstance(body, dict):
        return client.post(path, json=body)
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def assert_refused(response, fragment: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def assert_still_serving(client: TestClient) -> None:
    assert len(client.post("/generate", json=ONE_TOKEN).json()["output_ids"]) == 1


@pytest.mark.parametrize("body", [DEEP_LIST, DEEP_OBJECT], ids=["list", "object"])
@pytest.mark.parametrize("path", [*OBJECT_ROUTES, *CONTROL_ROUTES])
def test_deeply_nested_json_answers_400_and_the_server_keeps_serving(client, path: str,
                                                                      body: bytes) -> None:
    assert_refused(send(client, path, body), "malformed JSON body: nested too deeply")
    assert_still_serving(client)


@pytest.mark.parametrize("depth", [100, 500, 900, 990, 2000])
@pytest.mark.parametrize(("path", "template"), [
    ("/generate", '{"text": %s}'),
    ("/generate", '{"text": "a", "sampling_params": {"stop": %s}}'),
    ("/generate", '{"text": "a", "lora_path": %s}'),
    ("/v1/chat/completions", '{"messages": [{"role": %s, "content": "hi"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}], "max_tokens": 1}'),
    ("/v1/completions", '{"prompt": %s}'),
    ("/update_weights_from_disk", '{"model_path": %s}'),
])
def test_nesting_inside_a_field_never_answers_500(client, path: str, template: str,
                                                  depth: int) -> None:
    """Just under the decoder's depth limit too: nothing after decoding recurses into a
    value (error messages name types, not values)."""
    for nested in ("[" * depth + '"x"' + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        response = send(client, path, (template % nested).encode())
        assert response.status_code < 500, response.text
    assert_still_serving(client)


@pytest.mark.parametrize("body", [b'"hi"', b"3", b"[1, 2]", b"null", b"true"])
@pytest.mark.parametrize("path", [*OBJECT_ROUTES, *CONTROL_ROUTES])
def test_json_that_is_not_an_object_answers_400(client, path: str, body: bytes) -> None:
    assert_refused(send(client, path, body), "the request body must be a JSON object")


@pytest.mark.parametrize("body", [b'{"text": "\xff\xfe"}', b"{not json", b'{"text": "a"'],
                         ids=["invalid-utf8", "not-json", "truncated"])
@pytest.mark.parametrize("path", [*OBJECT_ROUTES, *CONTROL_ROUTES])
def test_bytes_that_are_not_json_answer_400(client, path: str, body: bytes) -> None:
    assert_refused(send(client, path, body), "malformed JSON body")


@pytest.mark.parametrize("path", OBJECT_ROUTES)
def test_an_empty_body_is_malformed_where_a_body_is_required(client, path: str) -> None:
    assert_refused(send(client, path, b""), "malformed JSON body")


def test_control_routes_take_an_absent_body_as_an_empty_object(client) -> None:
    assert send(client, "/pause_generation", b"").json()["message"] == (
        "generation paused (mode=abort)")
    assert send(client, "/continue_generation", b"").json()["message"] == "generation continued"
    assert_refused(send(client, "/update_weights_from_disk", b""),
                   "missing required field 'model_path'")
    destroyed = send(client, "/destroy_weights_update_group", b"")
    assert destroyed.status_code == 400 and destroyed.json()["success"] is False


def test_null_means_the_default_on_control_routes(client) -> None:
    paused = send(client, "/pause_generation", {"mode": None, "rid": None})
    assert paused.json() == {"success": True, "message": "generation paused (mode=abort)"}
    assert send(client, "/continue_generation", {"rid": None}).json()["success"]


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/generate", {"text": "a", "return_logprob": "yes"}, "'return_logprob' must be a boolean"),
    ("/generate", {"text": "a", "stream": None}, "'stream' must be a boolean"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "no"},
     "'add_special_tokens' must be a boolean"),
    ("/tokenize", {"prompt": None, "text": "hi"}, "'prompt' must be a string or a list of strings"),
    ("/detokenize", {"tokens": [True]}, "'tokens' must be a list of token ids"),
    ("/detokenize", {"tokens": [10**9]}, "'tokens' has ids outside the vocabulary"),
    ("/abort_request", {"abort_all": "yes"}, "give 'rid' (a string) or 'abort_all': true"),
    ("/abort_request", {}, "give 'rid' (a string) or 'abort_all': true"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 21},
     "'top_logprobs' must be an integer in [0, 20]"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": 1}, "'logprobs' must be a boolean"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": 3},
     "'chat_template_kwargs' must be an object"),
    ("/v1/chat/completions", {"messages": [3]}, "messages[0] has an unknown role None"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": "x"},
     "sampling parameter 'max_new_tokens' must be int, got str"),
    ("/v1/completions", {"prompt": []},
     "'prompt' must be a string, a list of strings or token ids"),
    ("/v1/completions", {"prompt": [[1, "a"]]},
     "'prompt' must be a string, a list of strings or token ids"),
    ("/v1/completions", {"prompt": ["a", "b"], "rid": ["only-one"]},
     "'rid' must be a string, or a list of strings with one per prompt"),
    ("/v1/completions", {"prompt": "a", "logprobs": True},
     "'logprobs' must be an integer in [0, 20]"),
    ("/init_weights_update_group", {"master_address": "x", "master_port": True,
                                    "rank_offset": 1, "world_size": 2},
     "'master_port' has the wrong type (bool)"),
    ("/update_weights_from_disk", {"model_path": "/x", "flush_cache": 1},
     "'flush_cache' has the wrong type (int)"),
    ("/update_weights_from_disk", {"model_path": "/x", "load_format": "pt"},
     "load_format must be null, 'auto' or 'safetensors'"),
    ("/update_weights_from_disk", {"model_path": "/x", "apply": False},
     "'apply': false is only for update_weights_from_distributed"),
    ("/update_weights_from_distributed", {"names": "a", "dtypes": [], "shapes": []},
     "'names' has the wrong type (str)"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": []},
     "'serialized_named_tensors' must hold one base64 string per tensor-parallel rank"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["x"], "load_format": "y"},
     "load_format must be null, 'direct' or 'flattened_bucket'"),
    ("/get_weights_by_name", {"name": "w", "truncate_size": "3"},
     "'truncate_size' has the wrong type (str)"),
    ("/pause_generation", {"mode": 3}, "'mode' has the wrong type (int)"),
])
def test_a_bad_field_answers_400_naming_it(client, path: str, body: dict, message: str) -> None:
    assert_refused(send(client, path, body), message)


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"text": "a", "lora_path": "/x"}),
    ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function"}]}),
    ("/v1/completions", {"prompt": "a", "echo": True}),
    ("/update_weights_from_disk", {"model_path": "/x", "foo": 1}),
    ("/pause_generation", {"foo": 1}),
    ("/continue_generation", {"foo": 1}),
])
def test_unknown_fields_that_are_set_are_refused_where_they_would_change_the_result(
        client, path: str, body: dict) -> None:
    assert_refused(send(client, path, body), "unknown or unsupported field(s)")


def test_unknown_fields_left_empty_and_sglang_no_ops_pass(client) -> None:
    assert send(client, "/generate", {**ONE_TOKEN, "lora_path": None}).status_code == 200
    assert send(client, "/continue_generation", {"rid": "x", "token_step": 3}).json()["success"]


def test_tokenize_detokenize_and_abort_ignore_unknown_fields(client) -> None:
    ids = send(client, "/tokenize", {"prompt": "hello", "foo": 1}).json()["tokens"]
    assert send(client, "/detokenize", {"tokens": ids, "foo": 1}).json()["text"] == "hello"
    assert send(client, "/tokenize", {"text": "hello"}).json()["tokens"] == ids
    assert send(client, "/abort_request", {"rid": "none", "foo": 1}).json() == {"success": True}


def test_sampling_parameters_at_the_top_level_are_refused_before_unknown_fields(client) -> None:
    assert_refused(send(client, "/generate", {"text": "a", "temperature": 0.5, "foo": 1}),
                   "sampling parameter(s) temperature must go inside 'sampling_params'")


def test_get_weights_by_name_reads_the_query_or_the_body(client) -> None:
    rows = client.get("/get_weights_by_name", params={"name": "lm_head.weight",
                                                      "truncate_size": "2"}).json()
    assert len(rows) == 2
    assert send(client, "/get_weights_by_name", {"name": "lm_head.weight",
                                                 "truncate_size": 2}).json() == rows
    assert_refused(client.get("/get_weights_by_name", params={"name": "lm_head.weight",
                                                              "truncate_size": "x"}),
                   "'truncate_size' must be an integer")
    assert_refused(client.get("/get_weights_by_name"), "missing required field 'name'")
    assert_refused(client.get("/get_weights_by_name", params={"name": "nope"}),
                   "'nope' is not a parameter of this model")


def test_openai_sampling_names_reach_the_engine_as_sglang_names(client) -> None:
    def tokens(**options: object) -> tuple[int, str]:
        reply = send(client, "/v1/completions", {"prompt": "Once", "temperature": 1.0,
                                                 "ignore_eos": True, **options}).json()
        return reply["usage"]["completion_tokens"], reply["choices"][0]["text"]

    assert tokens(max_tokens=3)[0] == 3
    assert tokens(max_completion_tokens=2)[0] == 2
    assert tokens(max_tokens=5, min_tokens=5)[0] == 5
    assert tokens(max_tokens=4, seed=11) == tokens(max_tokens=4, seed=11)


def test_valid_control_bodies_reach_the_engine(client, llama_path) -> None:
    updated = send(client, "/update_weights_from_disk", {"model_path": str(llama_path),
                                                         "weight_version": "v2"})
    assert updated.json() == {"success": True, "message": updated.json()["message"]}
    assert client.get("/model_info").json()["weight_version"] == "v2"
    refused = send(client, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0, "world_size": 2})
    assert refused.json()["success"] is False and "rank_offset" in refused.json()["message"]
    assert_still_serving(client)
