"""Tensor parallelism: ranks in a real gloo group, each holding its share of every weight,
compute the whole model's logits (before and after a weight update), and an engine with
tp_size=2 (ranks as child processes) generates what tp_size=1 does."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import requests
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, tp_ranks
from transformers import AutoModelForCausalLM

from rollserve import Engine
from rollserve.client import InferenceHTTPClient
from rollserve.engine.api import EngineAPI
from rollserve.engine.args import EngineArgs
from rollserve.engine.engine_process import EngineProcess
from rollserve.kernels import build
from rollserve.models.attention import AttentionBatch, ExtendSpan
from rollserve.models.config import load_model_config
from rollserve.models.llama import CausalLM
from rollserve.models.loader import iter_checkpoint_tensors, load_model
from rollserve.models.parallel import SINGLE, TensorParallel, head_shard
from rollserve.rl import RolloutService, WeightSyncError
from rollserve.weights.group import destroy_weights_group, init_weights_group
from rollserve.weights.ipc import serialize_named_tensors

NO_PROXY = {"http": None, "https": None}

PROMPT = [3, 17, 5, 42, 8, 11, 29, 2, 7, 19, 23, 4, 9]


def _logits(model: CausalLM) -> torch.Tensor:
    """One prompt's prefill through the model's own attention path and KV layout."""
    tokens = len(PROMPT)
    attn = model.model.layers[0].self_attn
    cache = torch.zeros(model.config.num_layers, attn.num_kv_heads, 32, attn.head_dim)
    slots = torch.arange(tokens)
    batch = AttentionBatch(slots, slots, 0, None, None, None, [ExtendSpan(0, tokens, slots, None)],
                           cache, cache.clone())
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(PROMPT), batch))


def _updated(path: Path) -> list[tuple[str, torch.Tensor]]:
    """A whole-tensor weight update as a trainer sends it: every tensor changed."""
    return [(name, t.float() * 0.5 + 0.01) for name, t in iter_checkpoint_tensors(path)
            if name != "lm_head.weight" or not load_model_config(path).tie_word_embeddings]


def _rank(rank: int, size: int, port: int, path: Path, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    try:
        model = load_model(path, torch.float32, torch.device("cpu"), 64,
                           TensorParallel(rank, size, dist.group.WORLD))
        before = _logits(model)
        for name, tensor in _updated(path):
            model.install_weight(name, tensor)
        results[rank] = (before, _logits(model))
    finally:
        dist.destroy_process_group()


def _run_ranks(path: Path, size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(size, free_port(), path, results), nprocs=size, join=True)
    return dict(results)


@pytest.mark.parametrize("preset", ["llama", "qwen2", "qwen3", "mistral"])
def test_two_ranks_compute_the_whole_models_logits_before_and_after_an_update(
        preset, tiny_model_factory) -> None:
    path = tiny_model_factory(preset)
    whole = load_model(path, torch.float32, torch.device("cpu"), 64)
    expected_before = _logits(whole)
    for name, tensor in _updated(path):
        whole.install_weight(name, tensor)
    expected_after = _logits(whole)
    results = _run_ranks(path, 2)
    for rank in (0, 1):
        before, after = results[rank]
        torch.testing.assert_close(before, expected_before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after, expected_after, rtol=1e-5, atol=1e-5)


def test_each_rank_holds_its_share_of_every_checkpoint_tensor(tiny_model_factory) -> None:
    path = tiny_model_factory("mistral")  # one KV head: replicated on both ranks
    tensors = dict(iter_checkpoint_tensors(path))
    config = load_model_config(path)
    with torch.device("meta"):
        ranks = [CausalLM(config, 64, TensorParallel(r, 2)) for r in (0, 1)]
    q, k, o = (f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k", "o"))
    for rank, model in enumerate(ranks):
        assert model.slots[q].source.of(tensors[q]).shape == (32, 64)  # 2 of 4 heads
        assert torch.equal(model.slots[q].source.of(tensors[q]), tensors[q][32 * rank:][:32])
        assert model.slots[k].source is None  # the one KV head, whole on every rank
        assert model.slots[o].source.dim == 1 and model.slots[o].shape == (64, 64)
    down = "model.layers.1.mlp.down_proj.weight"
    assert [m.slots[down].source.start for m in ranks] == [0, 64]


def test_a_tp_size_that_does_not_divide_the_heads_is_refused_by_name(tiny_model_factory) -> None:
    config = load_model_config(tiny_model_factory("llama"))  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="tp_size=3 does not divide this model's 4 attention"):
        head_shard(config, TensorParallel(0, 3))
    with pytest.raises(ValueError, match="3 KV heads"):
        head_shard(replace(config, num_heads=6, num_kv_heads=3), TensorParallel(0, 2))
    assert head_shard(config, SINGLE).num_heads == 4


# ---- the engine ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    shared = [5, 9, 14, 3, 27, 8, 31, 2, 19, 6, 11, 40, 7, 13, 22, 4, 17, 29, 33, 12]
    return [shared + [7 + i, 19, 33 + 2 * i][: 1 + i % 3] * (2 + i) for i in range(16)]


def _generate(path: Path, tp_size: int, device: str = "cpu") -> list[dict]:
    params = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    with Engine(str(path), dtype="float32", device=device, max_total_tokens=4096,
                tp_size=tp_size, chunked_prefill_size=24) as engine:
        first = engine.generate(input_ids=_prompts()[0], sampling_params=params)
        outputs = engine.generate(input_ids=_prompts(), sampling_params=params,
                                  return_logprob=True)
        assert engine.stats()["cached_tokens"] > 0  # the shared prefix came from the cache
    assert outputs[0]["output_ids"] == first["output_ids"]
    return outputs


@pytest.mark.parametrize("preset", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_tp2_engine_generates_the_tp1_tokens_and_logprobs(preset, tiny_model_factory) -> None:
    path = tiny_model_factory(preset)
    whole, split = _generate(path, 1), _generate(path, 2)
    for a, b in zip(whole, split, strict=True):
        assert a["output_ids"] == b["output_ids"]
        pairs = zip(a["meta_info"]["output_token_logprobs"],
                    b["meta_info"]["output_token_logprobs"], strict=True)
        assert max(abs(x[0] - y[0]) for x, y in pairs) < 1e-4


def test_without_a_compiler_the_ranks_all_reduce_over_gloo_with_the_same_tokens(
        tiny_model_factory, tmp_path, monkeypatch) -> None:
    path = tiny_model_factory("qwen3")
    with Engine(str(path), dtype="float32", device="cpu", max_total_tokens=256,
                tp_size=2) as engine:
        # shared memory wherever the kernels build (not on the PyTorch path)
        native = build.native_isa(torch.device("cpu"), torch.float32) is not None
        assert (engine.tp_ranks.tp.shm is not None) == native
    monkeypatch.setenv("ROLLSERVE_CACHE", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", "no-such-compiler")
    with Engine(str(path), dtype="float32", device="cpu", max_total_tokens=256,
                tp_size=2) as engine:
        assert engine.tp_ranks.tp.shm is None
    whole, split = _generate(path, 1), _generate(path, 2)
    assert [o["output_ids"] for o in whole] == [o["output_ids"] for o in split]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_tp2_engine_on_two_gpus_generates_the_tp1_tokens_and_logprobs(
        tiny_model_factory) -> None:
    path = tiny_model_factory("qwen2")
    whole, split = _generate(path, 1, "cuda"), _generate(path, 2, "cuda")
    for a, b in zip(whole, split, strict=True):
        assert a["output_ids"] == b["output_ids"]
        pairs = zip(a["meta_info"]["output_token_logprobs"],
                    b["meta_info"]["output_token_logprobs"], strict=True)
        assert max(abs(x[0] - y[0]) for x, y in pairs) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_tp_size_beyond_the_visible_gpus_is_refused(tiny_model_factory) -> None:
    gpus = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"tp_size={gpus + 1} from GPU 0 needs GPUs "
                                         rf"0..{gpus}, but this process sees {gpus}"):
        Engine(str(tiny_model_factory("qwen2")), device="cuda", max_total_tokens=256,
               tp_size=gpus + 1)


def test_a_tp_size_without_a_core_per_rank_is_refused(tiny_model_factory, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    with pytest.raises(ValueError, match="tp_size=2 needs a CPU core per rank"):
        Engine(str(tiny_model_factory("qwen2")), device="cpu", max_total_tokens=256, tp_size=2)


def test_a_rank_that_dies_stops_the_engine_with_the_reason(tiny_model_factory) -> None:
    params = {"temperature": 0.0, "max_new_tokens": 4}
    with Engine(str(tiny_model_factory("qwen2")), dtype="float32", device="cpu",
                max_total_tokens=1024, tp_size=2) as engine:
        engine.tp_ranks._processes[0].kill()  # not joined here: the engine's watcher reaps it
        try:  # the watcher stops the engine, or this request's step finds the rank gone first
            out = engine.generate(input_ids=[1, 2, 3], sampling_params=params)
        except RuntimeError as exc:
            reason = str(exc)
        else:
            assert out["meta_info"]["finish_reason"]["type"] == "abort"
            reason = out["meta_info"]["finish_reason"]["message"]
        assert "tensor-parallel rank 1 exited with code -9" in reason
        with pytest.raises(RuntimeError, match="the engine stopped: tensor-parallel rank 1 "
                                               "exited with code -9"):
            engine.generate(input_ids=[1, 2, 3], sampling_params=params)


def test_a_rank_that_dies_mid_step_stops_the_engine_with_the_reason(tiny_model_factory) -> None:
    """The rank dies while rank 0 waits for it in a collective (shared memory): rank 0 gives
    up instead of waiting forever, and the request in flight ends with the reason."""
    params = {"temperature": 0.0, "max_new_tokens": 2000, "ignore_eos": True}
    with Engine(str(tiny_model_factory("qwen2")), dtype="float32", device="cpu",
                max_total_tokens=4096, tp_size=2) as engine:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(engine.generate, input_ids=[[1, 2, 3]] * 16,
                                  sampling_params=params)
            time.sleep(0.5)  # decoding: both ranks step in lockstep
            assert not pending.done()
            engine.tp_ranks._processes[0].kill()
            outs = pending.result(timeout=60)
        for out in outs:
            assert out["meta_info"]["finish_reason"]["type"] == "abort"
            assert ("tensor-parallel rank 1 exited with code -9"
                in out["meta_info"]["finish_reason"]["message"])


def _is_spawned_rank(process: psutil.Process) -> bool:
    """A spawned worker (not multiprocessing's resource tracker, also a child of ours)."""
    try:
        command = " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False
    return "spawn_main" in command and "resource_tracker" not in command


def test_a_rank_that_dies_at_start_fails_the_start_with_the_reason(tiny_model_factory) -> None:
    before = {p.pid for p in psutil.Process().children()}
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(Engine, str(tiny_model_factory("qwen2")), dtype="float32",
                               device="cpu", max_total_tokens=1024, tp_size=2)
        deadline = time.monotonic() + 60
        while not (ranks := [p for p in psutil.Process().children()
                             if p.pid not in before and _is_spawned_rank(p)]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ranks[0].kill()  # rank 1, still importing torch: long before it joins the group
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 exited with code -9 "
                                               r"while starting"):
            starting.result(timeout=120)
    assert not [p for p in psutil.Process().children()
                if p.pid not in before and _is_spawned_rank(p)]  # no rank left behind


# ---- weight updates into a tp=2 engine -------------------------------------------------------

def _same_outputs(a: EngineAPI, b: EngineAPI) -> None:
    params = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
    outs = [e.generate(input_ids=_prompts()[:6], sampling_params=params, return_logprob=True)
            for e in (a, b)]
    for x, y in zip(*outs, strict=True):
        assert x["output_ids"] == y["output_ids"]
        pairs = zip(x["meta_info"]["output_token_logprobs"],
                    y["meta_info"]["output_token_logprobs"], strict=True)
        assert max(abs(p[0] - q[0]) for p, q in pairs) < 1e-4


def _broadcast(engines: dict[int, EngineAPI], tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A trainer (this thread, rank 0) pushes `tensors` into engines joined at the given rank
    offsets: SGLang's protocol, world_size = 1 + the engines' TP ranks."""
    world = 1 + sum(e.args.tp_size for e in engines.values())
    port = free_port()
    with ThreadPoolExecutor(len(engines)) as pool:
        joins = [pool.submit(e.init_weights_update_group, "127.0.0.1", port, offset, world,
                             "tp-test") for offset, e in engines.items()]
        group = init_weights_group(master_address="127.0.0.1", master_port=port, rank=0,
                                   world_size=world, group_name="tp-test")
        for join in joins:
            join.result()
        names = [n for n, _ in tensors]
        dtypes = ["float32"] * len(tensors)
        shapes = [list(t.shape) for _, t in tensors]
        updates = [pool.submit(e.update_weights_from_distributed, names, dtypes, shapes,
                               "tp-test", weight_version="pushed") for e in engines.values()]
        for _, tensor in tensors:
            dist.broadcast(tensor.contiguous(), src=0, group=group)
        for update in updates:
            update.result()
    destroy_weights_group(group)
    for engine in engines.values():
        engine.destroy_weights_update_group("tp-test")


def test_weight_updates_reach_every_rank_of_a_tp2_engine(tiny_model_factory) -> None:
    """Engines in processes of their own, as servers run them: each process holds one group
    of a name, and the trainer (this process) another."""
    path, other = tiny_model_factory("qwen2"), tiny_model_factory("qwen2", seed=1)
    options = {"dtype": "float32", "device": "cpu", "max_total_tokens": 2048}
    with EngineProcess(EngineArgs(str(path), **options)) as whole, \
            EngineProcess(EngineArgs(str(path), tp_size=2, **options)) as split:
        pushed = _updated(path)
        for engine in (whole, split):
            engine.update_weights_from_tensor(pushed)
        _same_outputs(whole, split)
        by_name = dict(pushed)
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
                     "model.layers.0.self_attn.k_proj.bias", "model.layers.0.mlp.up_proj.weight"):
            torch.testing.assert_close(torch.tensor(split.get_weights_by_name(name, 200)),
                                       by_name[name][:200])
        # One group for a tp=1 and a tp=2 engine: ranks 1 and 2-3.
        trained = [(n, t * 0.9) for n, t in pushed]
        _broadcast({1: whole, 2: split}, trained)
        assert split.weight_version == "pushed"
        _same_outputs(whole, split)
        for engine in (whole, split):
            engine.update_weights_from_disk(str(other))
        _same_outputs(whole, split)
        with Engine(str(other), tp_size=1, **options) as fresh:
            _same_outputs(fresh, split)


# ---- seed 002: a service of tp=2 engines ------------------------------------------------------

def test_each_rank_of_a_tp2_server_reads_its_own_serialized_payload(tiny_model_factory,
                                                                     start_server) -> None:
    """SGLang's /update_weights_from_tensor: a list with one payload per TP rank, rank r
    reading the r-th. Entries that differ show who read what: each rank keeps its share of
    the tensor from its own entry."""
    path = tiny_model_factory("qwen2")
    server = start_server(path, "--tp-size", "2")
    name = "model.layers.0.self_attn.o_proj.weight"  # split by input features across ranks
    old = dict(iter_checkpoint_tensors(path))[name].float()
    first, second = old * 0.5 + 0.01, old * -2.0
    half = old.shape[1] // 2

    def post(path: str, body: dict) -> requests.Response:
        return requests.post(server.url + path, json=body, timeout=60, proxies=NO_PROXY)

    def push(*entries: torch.Tensor) -> requests.Response:
        return post("/update_weights_from_tensor", {"serialized_named_tensors": [
            serialize_named_tensors([(name, t)]) for t in entries]})

    def served() -> torch.Tensor:
        body = {"name": name, "truncate_size": old.shape[0]}
        return torch.tensor(post("/get_weights_by_name", body).json())

    answer = push(first, second)
    assert answer.json()["success"], answer.text
    assert torch.equal(served(), torch.cat([first[:, :half], second[:, half:]], dim=1))
    answer = push(second)  # one payload for all ranks
    assert answer.json()["success"], answer.text
    assert torch.equal(served(), second)

    refused = push(first, first, first)
    assert refused.status_code == 400 and "tp_size=2" in refused.json()["message"]
    refused = push(first, first[:, :half])  # rank 1's entry has the wrong shape
    message = refused.json()["message"]
    assert refused.status_code == 400 and "tensor-parallel rank 1" in message, message
    assert torch.equal(served(), second)  # neither rank installed anything
    answer = push(first, first)
    assert answer.json()["success"], answer.text
    assert torch.equal(served(), first)


def test_a_seed_002_service_of_tp2_engines_serves_syncs_and_loses_an_engine_with_a_rank(
        tiny_model_factory) -> None:
    path = tiny_model_factory("llama")
    params = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
    prompts = [p[:6] for p in _prompts()[:8]]
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for param in trainer.parameters():
            param.mul_(0.9)
    with Engine(str(path), dtype="float32", device="cpu", max_total_tokens=2048) as whole:
        before = whole.generate(input_ids=prompts, sampling_params=params)
        whole.update_weights_from_tensor(trainer.named_parameters())
        after = whole.generate(input_ids=prompts, sampling_params=params)
    with RolloutService.from_pretrained(str(path), tp_size=2, dp_size=2, dtype="float32",
                                        max_total_tokens=2048) as service:
        assert service.get_tp_size() == 2 and service.get_dp_size() == 2
        outs = service.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in before]
        service.init_weight_update_group()  # world 1 + 2 + 2: every rank of both engines
        service.update_weights(trainer.named_parameters(), weight_version="step-1")
        outs = service.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in after]
        engine, url = service._fleet.engines[0], service._fleet.engine_urls[0]
        tp_ranks(engine.pid)[0].kill()
        deadline = time.monotonic() + 60
        while engine.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.exit_code() is not None  # the server went down with its rank
        assert not InferenceHTTPClient(url, connect_timeout=1).health()
        with pytest.raises(WeightSyncError, match=f"engine {url} unreachable"):
            service.shutdown()  # leaving the group names the engine that is gone
        assert service._fleet is None  # and the rest of the fleet is stopped all the same


def test_a_tp2_engine_streams_samples_n_and_gives_tp1s_top_logprobs(tiny_model_factory) -> None:
    path = tiny_model_factory("qwen3")
    greedy = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
    results = {}
    for tp_size in (1, 2):
        with Engine(str(path), dtype="float32", device="cpu", max_total_tokens=2048,
                    tp_size=tp_size) as engine:
            samples = engine.generate(input_ids=[3, 14, 15], sampling_params={**greedy, "n": 2},
                                      return_logprob=True, top_logprobs_num=3)
            engine.pause_generation("retract")
            engine.continue_generation()
            *_, (_, streamed, finished) = engine.stream(input_ids=[3, 14, 15],
                                                        sampling_params=greedy)
            assert finished
            results[tp_size] = samples, streamed
    (whole, whole_stream), (split, split_stream) = results[1], results[2]
    assert split_stream["output_ids"] == whole_stream["output_ids"] == whole[0]["output_ids"]
    for a, b in zip(whole, split, strict=True):
        assert a["output_ids"] == b["output_ids"]
        for x, y in zip(a["meta_info"]["output_top_logprobs"],
                        b["meta_info"]["output_top_logprobs"], strict=True):
            assert [t[1] for t in x] == [t[1] for t in y]
            assert max(abs(p[0] - q[0]) for p, q in zip(x, y, strict=True)) < 1e-4
