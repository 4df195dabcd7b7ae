"""Two rollserve servers behind the real sglang-router, and seed 003's client examples."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import free_port

from rollserve.cluster.router import RouterAPI
from rollserve.utils.process import ManagedProcess

NO_PROXY = {"http": None, "https": None}


class Router:
    """The real sglang-router on 127.0.0.1 (its metrics exporter on a free port too)."""

    def __init__(self, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = RouterAPI(self.url)
        self.process = ManagedProcess(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
             "--port", str(self.port), "--prometheus-port", str(free_port()), *flags],
            log_path)
        error = self.process.start_and_wait(self.api.is_up, timeout=60)
        if error is not None:
            raise RuntimeError(f"router did not start: {error}")

    def add_worker(self, url: str) -> None:
        self.api.register(url, timeout=60)

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="module")
def fleet(tiny_model_factory, tmp_path_factory):
    from conftest import ServerProcess

    logs = tmp_path_factory.mktemp("fleet")
    model = tiny_model_factory("llama")
    servers = [ServerProcess(model, log_dir=logs) for _ in range(2)]
    router = None
    try:
        for server in servers:
            server.wait_ready()
        router = Router(logs / "router.log", "--policy", "cache_aware",
                        "--cache-threshold", "0.3", "--balance-abs-threshold", "1000",
                        "--balance-rel-threshold", "100.0")
        for server in servers:
            router.add_worker(server.url)
        yield router, servers
    finally:
        if router is not None:
            router.stop()
        for server in servers:
            server.stop()


def test_generate_and_chat_through_the_router(fleet) -> None:
    router, _ = fleet
    out = requests.post(router.url + "/generate", json={
        "text": "The capital of France is",
        "sampling_params": {"temperature": 0, "max_new_tokens": 8}},
        proxies=NO_PROXY, timeout=60).json()
    assert out["meta_info"]["completion_tokens"] == 8
    chat = requests.post(router.url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "temperature": 0}, proxies=NO_PROXY, timeout=60).json()
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 5


def test_the_readme_curl_example_works_on_an_engine_and_through_the_router(fleet) -> None:
    from test_readme import readme_block

    if shutil.which("curl") is None:
        pytest.skip("no curl here")
    block = readme_block("## The HTTP server", "bash")
    command = re.search(r"^curl .*?[^\\]$", block, re.MULTILINE | re.DOTALL)[0]
    router, servers = fleet
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for url in (servers[0].url, router.url):
        done = subprocess.run(["bash", "-c", command.replace("http://127.0.0.1:30000", url)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["meta_info"]["completion_tokens"] == 16, done.stdout


def test_cache_aware_routing_reuses_the_prefix_on_one_engine(fleet) -> None:
    router, servers = fleet
    prefix = "shared system prompt about rollouts and rewards. " * 12
    before = [s_stats(s) for s in servers]
    first = requests.post(router.url + "/generate", json={
        "text": prefix + "first question", "sampling_params": {"max_new_tokens": 2}},
        proxies=NO_PROXY, timeout=60).json()
    second = requests.post(router.url + "/generate", json={
        "text": prefix + "second question", "sampling_params": {"max_new_tokens": 2}},
        proxies=NO_PROXY, timeout=60).json()
    assert first["meta_info"]["cached_tokens"] < second["meta_info"]["cached_tokens"]
    assert second["meta_info"]["cached_tokens"] > 0
    grew = [s_stats(s) - b for s, b in zip(servers, before, strict=True)]
    assert sorted(grew) == [0, 2]  # both requests on the same engine


def s_stats(server) -> int:
    """Requests this engine has finished so far."""
    info = requests.get(server.url + "/server_info", proxies=NO_PROXY, timeout=10).json()
    return info["internal_states"][0]["requests_finished"]


def test_router_flush_cache_reaches_both_engines(fleet) -> None:
    router, servers = fleet
    for server in servers:  # put something in each cache
        requests.post(server.url + "/generate", json={"input_ids": list(range(5, 40)),
                      "sampling_params": {"max_new_tokens": 1}}, proxies=NO_PROXY, timeout=60)
    assert all(_cache_tokens(s) > 0 for s in servers)
    answer = requests.post(router.url + "/flush_cache", proxies=NO_PROXY, timeout=30)
    assert answer.status_code == 200
    assert all(_cache_tokens(s) == 0 for s in servers)


def _cache_tokens(server) -> int:
    info = requests.get(server.url + "/server_info", proxies=NO_PROXY, timeout=10).json()
    return info["internal_states"][0]["cache_tokens"]


def test_seed_003_examples_work_unchanged(fleet) -> None:
    """Seed 003's requests and curl examples, with only URL and model name changed."""
    _, servers = fleet
    base = servers[0].url
    url = f"{base}/v1/chat/completions"
    data = {"model": "any-model",
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    response = requests.post(url, json=data, proxies=NO_PROXY)
    assert response.json()["choices"][0]["message"]["content"] is not None

    response = requests.post(f"{base}/generate", json={
        "text": "The capital of France is",
        "sampling_params": {"temperature": 0, "max_new_tokens": 32}}, proxies=NO_PROXY)
    assert response.json()["meta_info"]["finish_reason"] is not None

    response = requests.post(f"{base}/generate", json={
        "text": "The capital of France is",
        "sampling_params": {"temperature": 0, "max_new_tokens": 32}, "stream": True},
        stream=True, proxies=NO_PROXY)
    prev, output = 0, ""
    for chunk in response.iter_lines(decode_unicode=False):
        chunk = chunk.decode("utf-8")
        if chunk and chunk.startswith("data:"):
            if chunk == "data: [DONE]":
                break
            data = json.loads(chunk[5:].strip("\n"))
            output += data["text"][prev:]
            prev = len(data["text"])
    assert output == data["text"]

    curl = subprocess.run(
        ["curl", "-s", "--noproxy", "*", f"{base}/v1/chat/completions", "-d",
         json.dumps({"model": "m", "messages": [
             {"role": "user", "content": "What is the capital of France?"}]})],
        capture_output=True, text=True, check=True)
    assert json.loads(curl.stdout)["object"] == "chat.completion"


def test_client_through_the_router_sync_async_and_streaming(fleet) -> None:
    import asyncio

    from rollserve.client import InferenceHTTPClient

    router, _ = fleet
    client = InferenceHTTPClient(router.url)
    assert client.health()
    out = client.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4},
                          return_logprob=True)
    assert len(out["meta_info"]["output_token_logprobs"]) == 4
    deltas = list(client.stream_generate(prompt="Hi", sampling_params={"max_new_tokens": 6}))
    assert sum(len(d["output_ids"]) for d in deltas) == 6

    async def fan_out() -> list[dict]:
        async with InferenceHTTPClient(router.url) as c:
            return await asyncio.gather(*(c.async_generate(
                prompt=f"q{i}", sampling_params={"max_new_tokens": 2}) for i in range(50)))

    assert len(asyncio.run(fan_out())) == 50
    ordered = client.generate_many(prompts=[f"p{i}" for i in range(20)],
                                   sampling_params={"max_new_tokens": 1}, max_concurrency=5)
    assert len(ordered) == 20 and all(r["meta_info"]["completion_tokens"] == 1 for r in ordered)
