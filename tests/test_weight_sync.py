"""Weight sync into running engines: a trainer (HF transformers, rank 0) pushes over a real
gloo group to two real `launch_server` processes; updates with requests in flight, pause
modes, disk and same-host tensor updates, refusals that leave the old weights serving."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import pytest
import requests
import torch
from conftest import ServerProcess, free_port, generate_in_background
from safetensors.torch import load_file, save_file
from test_router_interop import Router
from transformers import AutoModelForCausalLM

from rollserve.rl import WeightSync, WeightSyncError
from rollserve.weights.group import destroy_weights_group, init_weights_group
from rollserve.weights.ipc import serialize_named_tensors

NO_PROXY = {"http": None, "https": None}
IDS = [5, 9, 22, 41, 7, 13, 100, 3, 17, 64, 8, 30]
LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0.0}
TOLERANCE = 1e-4


def post(url: str, path: str, body: dict | None = None) -> requests.Response:
    return requests.post(url + path, json=body, proxies=NO_PROXY, timeout=120)


def get(url: str, path: str) -> requests.Response:
    return requests.get(url + path, proxies=NO_PROXY, timeout=60)


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def engines(model_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("weight-sync")
    servers = [ServerProcess(model_path, log_dir=logs) for _ in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def trainer(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sync(engines):
    with WeightSync(engines, group_name="test_weights") as weight_sync:
        yield weight_sync


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def trainer_logprobs(model: torch.nn.Module, ids: list[int] = IDS) -> list[float]:
    """logprob of ids[i + 1] after ids[: i + 1], for every i; one more id: the last entry is
    the logprob of that id after all of `ids`."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def engine_logprobs(url: str, ids: list[int] = IDS) -> tuple[list[float], dict]:
    out = post(url, "/generate", {
        "input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}).json()
    return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]], out["meta_info"]


def assert_serves(url: str, expected: list[float]) -> dict:
    got, meta = engine_logprobs(url)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < TOLERANCE
    return meta


def test_push_makes_every_engine_serve_the_trainer_weights(engines, trainer, sync) -> None:
    perturb(trainer, seed=1)
    sync.push(trainer.named_parameters(), weight_version="step-1")
    expected = trainer_logprobs(trainer)
    for url in engines:
        assert assert_serves(url, expected)["weight_version"] == "step-1"
        assert get(url, "/model_info").json()["weight_version"] == "step-1"
        assert get(url, "/get_server_info").json()["weight_version"] == "step-1"
    name = "model.layers.1.mlp.up_proj.weight"
    values = post(engines[1], "/get_weights_by_name", {"name": name, "truncate_size": 3}).json()
    pushed = dict(trainer.named_parameters())[name][:3]
    assert torch.allclose(torch.tensor(values), pushed, atol=1e-7)
    by_get = get(engines[0], f"/get_weights_by_name?name={name}&truncate_size=3").json()
    assert by_get == values
    unknown = post(engines[0], "/get_weights_by_name", {"name": "model.no_such.weight"})
    assert unknown.status_code == 400 and "model.no_such.weight" in unknown.text


def test_small_buckets_and_flattened_buckets_switch_weights_once(engines, trainer) -> None:
    perturb(trainer, seed=2)
    with WeightSync(engines, group_name="flat", bucket_bytes=20_000, flatten=True) as flat:
        flat.push(trainer.named_parameters(), weight_version="step-2")
    for url in engines:
        assert assert_serves(url, trainer_logprobs(trainer))["weight_version"] == "step-2"


@pytest.mark.parametrize(("name", "tensor", "fragment"), [
    ("model.layers.0.mlp.no_such.weight", torch.zeros(4), "not a parameter"),
    ("model.norm.weight", torch.zeros(32), "shape [32]"),
    ("model.norm.weight", torch.zeros(64, dtype=torch.int64), "dtype int64"),
])
def test_bad_push_is_refused_naming_the_tensor_and_old_weights_serve(
        engines, sync, name, tensor, fragment) -> None:
    before = [engine_logprobs(url)[0] for url in engines]
    with pytest.raises(WeightSyncError, match=re.escape(fragment)) as refused:
        sync.push([(name, tensor)])
    assert name in str(refused.value)
    answer = post(engines[0], "/update_weights_from_distributed", {
        "names": [name], "dtypes": [str(tensor.dtype).removeprefix("torch.")],
        "shapes": [list(tensor.shape)], "group_name": "test_weights"})
    assert answer.status_code == 400 and answer.json()["success"] is False
    assert name in answer.json()["error"]["message"] and fragment in answer.json()["message"]
    for url, expected in zip(engines, before, strict=True):
        assert_serves(url, expected)


def test_update_while_streaming_waits_for_the_streams(engines, trainer, sync) -> None:
    url = engines[0]
    old_version = get(url, "/model_info").json()["weight_version"]

    def stream(index: int, finals: list) -> None:
        response = requests.post(url + "/generate", json={
            "input_ids": [5 + index, 6, 7], "stream": True,
            "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}},
            stream=True, proxies=NO_PROXY, timeout=120)
        lines = [line.decode() for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        finals[index] = json.loads(lines[-2][5:])["meta_info"]

    finals: list = [None] * 3
    streams = [threading.Thread(target=stream, args=(i, finals)) for i in range(3)]
    for thread in streams:
        thread.start()
    deadline = time.monotonic() + 30
    while get(url, "/get_load").json()["num_running_reqs"] < 3:
        assert time.monotonic() < deadline, "the streams never ran together"
        time.sleep(0.01)
    perturb(trainer, seed=3)
    pushing = threading.Thread(target=lambda: sync.push(trainer.named_parameters(),
                                                        weight_version="step-3"))
    pushing.start()
    # Once the update is received it waits for the streams; a new request queues behind it.
    # (A fixed sleep here let the new request start first on a loaded machine.)
    while _internal_state(url)["weight_updates_waiting"] == 0:
        assert time.monotonic() < deadline + 30, "the update never waited for the streams"
        time.sleep(0.01)
    assert _internal_state(url)["num_running_reqs"] == 3
    queued = post(url, "/generate", {"input_ids": [5, 6], "sampling_params": {
        "max_new_tokens": 2}}).json()
    pushing.join(timeout=60)
    for thread in streams:
        thread.join(timeout=60)
    assert [f["finish_reason"] for f in finals] == [{"type": "length", "length": 1500}] * 3
    assert {f["weight_version"] for f in finals} == {old_version}  # one version each
    assert queued["meta_info"]["weight_version"] == "step-3"
    assert assert_serves(url, trainer_logprobs(trainer))["weight_version"] == "step-3"


def _internal_state(url: str) -> dict:
    return get(url, "/get_server_info").json()["internal_states"][0]


def test_pause_abort_ends_requests_and_queues_new_ones(engines) -> None:
    url = engines[1]
    worker, result = generate_in_background(url, {"input_ids": [5, 6, 7],
                                                  "sampling_params": LONG})
    assert post(url, "/pause_generation", {"mode": "abort"}).json()["success"] is True
    worker.join(timeout=30)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    queued: dict = {}
    waiter = threading.Thread(target=lambda: queued.update(post(url, "/generate", {
        "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4}}).json()))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive(), "a request ran while generation was paused"
    assert post(url, "/continue_generation").json()["success"] is True
    waiter.join(timeout=30)
    assert queued["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_update_while_paused_applies_at_once_and_requests_continue(
        engines, trainer, sync, mode) -> None:
    url = engines[0]
    worker, result = generate_in_background(url, {"input_ids": list(range(5, 45)),
                                                  "sampling_params": LONG})
    post(url, "/pause_generation", {"mode": mode})
    load = get(url, "/get_load").json()
    assert load["num_running_reqs"] == (1 if mode == "in_place" else 0)
    perturb(trainer, seed=4)
    sync.push(trainer.named_parameters(), weight_version=f"paused-{mode}")
    # A flush with requests paused (their KV from the old weights in use) always succeeds...
    assert post(url, "/flush_cache").json()["success"] is True
    # ...and a new request sharing their prefix computes it afresh on the new weights.
    prompt = [*range(5, 45), 7]
    later: dict = {}
    probe = threading.Thread(target=lambda: later.update(post(url, "/generate", {
        "input_ids": prompt, "return_logprob": True,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}).json()))
    probe.start()
    post(url, "/continue_generation")
    worker.join(timeout=60)
    probe.join(timeout=60)
    assert result["meta_info"]["finish_reason"] == {"type": "length", "length": 1500}
    assert result["meta_info"]["weight_version"] == f"paused-{mode}"
    if mode == "in_place":  # the paused request's prefix is still in use, but unmatchable
        assert later["meta_info"]["cached_tokens"] == 0
    logprob, token, _ = later["meta_info"]["output_token_logprobs"][0]
    assert abs(logprob - trainer_logprobs(trainer, [*prompt, token])[-1]) < TOLERANCE


def test_update_from_disk_switches_checkpoints_and_refuses_other_shapes(
        engines, model_path, tiny_model_factory, tmp_path) -> None:
    url = engines[1]
    other = tiny_model_factory("llama", seed=1)
    for path, version in ((other, "disk-seed1"), (model_path, "disk-seed0")):
        answer = post(url, "/update_weights_from_disk", {"model_path": str(path),
                                                         "weight_version": version})
        assert answer.status_code == 200 and answer.json()["success"] is True
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert assert_serves(url, trainer_logprobs(reference))["weight_version"] == version
        assert get(url, "/model_info").json()["model_path"] == str(path)
    before = engine_logprobs(url)[0]
    wrong = tmp_path / "wrong-shape"
    shutil.copytree(model_path, wrong)
    tensors = load_file(wrong / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(32)
    save_file(tensors, wrong / "model.safetensors")
    for path, fragment in ((wrong, "'model.norm.weight' has shape [32]"),
                           (tiny_model_factory("qwen2"), "another architecture")):
        answer = post(url, "/update_weights_from_disk", {"model_path": str(path)})
        assert answer.status_code == 400 and fragment in answer.json()["message"]
    assert_serves(url, before)


def test_update_from_tensor_on_the_same_host(engines, trainer) -> None:
    perturb(trainer, seed=5)
    payload = serialize_named_tensors((n, p.detach().clone()) for n, p in
                                      trainer.named_parameters())
    refused = post(engines[0], "/update_weights_from_tensor", {
        "serialized_named_tensors": [payload, payload]})  # one per rank, and tp_size is 1
    assert refused.status_code == 400
    assert "holds 2 payloads, but this engine has tp_size=1" in refused.json()["message"]
    answer = post(engines[0], "/update_weights_from_tensor", {
        "serialized_named_tensors": [payload], "weight_version": "tensor-5"})
    assert answer.json() == {"success": True, "message": answer.json()["message"]}
    assert assert_serves(engines[0], trainer_logprobs(trainer))["weight_version"] == "tensor-5"


def test_in_process_update_with_tied_embeddings_takes_an_hf_state_dict(
        tiny_model_factory) -> None:
    from rollserve import Engine

    path = tiny_model_factory("qwen2")  # lm_head tied to the embedding
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    perturb(reference, seed=7)
    assert "lm_head.weight" in reference.state_dict()
    with Engine(str(path), dtype="float32", device="cpu", max_total_tokens=2048) as engine:
        engine.update_weights_from_tensor(reference.state_dict().items(), weight_version="7")
        out = engine.generate(input_ids=IDS, sampling_params={"max_new_tokens": 1},
                              return_logprob=True, logprob_start_len=0)
    got = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    expected = trainer_logprobs(reference)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < TOLERANCE
    assert out["meta_info"]["weight_version"] == "7"


def test_bf16_engine_updated_from_disk_matches_one_loaded_from_it(tiny_model_factory) -> None:
    """Casting to bf16 on the way in and remaking the oneDNN-prepacked forms after the swap
    (test_linear: the plain path meanwhile is bit-identical) gives exactly what an engine
    loaded from the checkpoint gives."""
    from rollserve import Engine

    base, other = tiny_model_factory("qwen2"), tiny_model_factory("qwen2", seed=1)
    request = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 16, "temperature": 0.0},
               "return_logprob": True, "logprob_start_len": 0}
    options = {"dtype": "bfloat16", "device": "cpu", "max_total_tokens": 2048}
    with Engine(str(other), **options) as loaded:
        expected = loaded.generate(**request)
    with Engine(str(base), **options) as engine:
        engine.update_weights_from_disk(str(other))
        first = engine.generate(**request)
        assert engine.stats()["unpacked_weights"] == 0
        second = engine.generate(**request)
    for out in (first, second):
        assert out["output_ids"] == expected["output_ids"]
        assert out["meta_info"]["input_token_logprobs"] == \
            expected["meta_info"]["input_token_logprobs"]
        assert out["meta_info"]["output_token_logprobs"] == \
            expected["meta_info"]["output_token_logprobs"]


def test_group_join_in_progress_does_not_block_serving(engines) -> None:
    url, port = engines[0], free_port()
    joining: dict = {}
    join = threading.Thread(target=lambda: joining.update(post(url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": "late", "backend": "gloo"}).json()))
    join.start()
    time.sleep(0.3)
    assert get(url, "/health").status_code == 200
    out = post(url, "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})
    assert out.json()["meta_info"]["completion_tokens"] == 2
    group = init_weights_group(master_address="127.0.0.1", master_port=port, rank=0,
                               world_size=2, group_name="late")
    join.join(timeout=30)
    assert joining["success"] is True
    assert post(url, "/destroy_weights_update_group", {"group_name": "late"}).json()["success"]
    destroy_weights_group(group)


def test_weight_sync_finds_engines_through_the_router(engines, trainer, tmp_path) -> None:
    # Its own metrics port: the default one may be taken by another router on this machine.
    router = Router(tmp_path / "router.log", "--prometheus-port", str(free_port()))
    try:
        for url in engines:
            router.add_worker(url)
        perturb(trainer, seed=6)
        with WeightSync(router_url=router.url, group_name="via_router") as via_router:
            assert sorted(e.url for e in via_router.engines) == sorted(engines)
            via_router.push(trainer.named_parameters(), weight_version="router-6")
    finally:
        router.stop()
    for url in engines:
        assert assert_serves(url, trainer_logprobs(trainer))["weight_version"] == "router-6"



def test_engine_calls_after_shutdown_raise_instead_of_hanging(model_path) -> None:
    """Commands queued for an engine thread that has ended (a weight or pause call racing
    the server's shutdown) must fail, not block their caller forever."""
    from rollserve import Engine

    engine = Engine(str(model_path), dtype="float32", device="cpu", max_total_tokens=512)
    engine.shutdown()
    errors: list = []

    def call() -> None:
        for fn in (lambda: engine.pause_generation("in_place"), engine.continue_generation,
                   lambda: engine.get_weights_by_name("model.norm.weight")):
            try:
                fn()
            except RuntimeError as exc:
                errors.append(str(exc))

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=20)
    assert not caller.is_alive(), "a call on a shut-down engine never returned"
    assert errors == ["the engine is shut down"] * 3


def test_group_join_refuses_rank_0_which_is_the_trainers(engines) -> None:
    answer = post(engines[0], "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 0,
        "world_size": 2, "group_name": "rank_zero", "backend": "gloo"})
    assert answer.status_code == 400 and "rank_offset" in answer.json()["error"]["message"]
