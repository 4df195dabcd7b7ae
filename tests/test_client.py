"""InferenceHTTPClient (seed 000) against a real rollserve server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import free_port

from rollserve.client import InferenceHTTPClient, InferenceHTTPError

GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


def test_seed_000_sync_example(llama_server) -> None:
    client = InferenceHTTPClient(llama_server.url + "/")  # a trailing slash is fine
    assert client.health()
    out = client.generate(prompt="The capital of France is",
                          sampling_params={"temperature": 0.0, "max_new_tokens": 32})
    assert out["meta_info"]["completion_tokens"] == 32
    reply = client.chat_completion(messages=[{"role": "user", "content": "Hello"}],
                                   model="any", temperature=0.0, max_tokens=32)
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_seed_000_async_fan_out_of_200_requests(llama_server) -> None:
    async def fan_out(router_url: str, prompts: list[str]) -> list[dict]:
        async with InferenceHTTPClient(router_url) as client:
            tasks = [client.async_generate(prompt=p, sampling_params=GREEDY) for p in prompts]
            return await asyncio.gather(*tasks)

    prompts = [f"prompt number {i}" for i in range(200)]
    results = asyncio.run(fan_out(llama_server.url, prompts))
    assert len(results) == 200 and all(r["meta_info"]["completion_tokens"] == 8 for r in results)


def test_token_ids_logprobs_and_chat_async(llama_server) -> None:
    async def run() -> tuple[dict, dict]:
        async with InferenceHTTPClient(llama_server.url) as client:
            out = await client.async_generate(input_ids=[5, 6, 7], sampling_params=GREEDY,
                                              return_logprob=True)
            chat = await client.async_chat_completion(
                messages=[{"role": "user", "content": "Hi"}], model="m", max_tokens=4)
            return out, chat

    out, chat = asyncio.run(run())
    triples = out["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"] and all(t[0] <= 0 for t in triples)
    assert chat["usage"]["completion_tokens"] == 4


def test_session_is_released_and_recreated_after_aclose(llama_server) -> None:
    async def run() -> None:
        client = InferenceHTTPClient(llama_server.url)
        assert client._session is None  # lazy: no session until the first async call
        assert await client.async_health()
        session = client._session
        await client.aclose()
        assert session.closed and client._session is None
        assert await client.async_health()  # usable again: a fresh session
        assert client._session is not session
        await client.aclose()

    asyncio.run(run())


def test_a_session_never_closed_is_closed_when_its_event_loop_ends(llama_server) -> None:
    script = textwrap.dedent(f"""
        import asyncio, gc
        from rollserve.client import InferenceHTTPClient
        client = InferenceHTTPClient({llama_server.url!r})

        async def ask():
            out = await client.async_generate(input_ids=[1, 2, 3], sampling_params={GREEDY!r})
            return len(out["output_ids"])

        print(asyncio.run(ask()), client._session.closed)
        print(asyncio.run(ask()))  # a later loop gets a fresh session
        gc.collect()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["8", "True", "8"]
    assert "Unclosed" not in done.stderr, done.stderr


def test_health_is_false_quickly_when_nothing_listens() -> None:
    client = InferenceHTTPClient(f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
    start = time.monotonic()
    assert client.health() is False
    assert asyncio.run(client.async_health()) is False
    assert time.monotonic() - start < 3


def test_errors_carry_status_url_and_server_message(llama_server) -> None:
    client = InferenceHTTPClient(llama_server.url)
    with pytest.raises(InferenceHTTPError) as err:
        client.generate(prompt="x", sampling_params={"temprature": 1})
    assert err.value.status == 400 and "temprature" in err.value.message
    assert err.value.url.endswith("/generate")
    with pytest.raises(ValueError, match="exactly one"):
        client.generate(prompt="x", input_ids=[1])
    with pytest.raises(OSError):  # connection refused raises promptly
        InferenceHTTPClient(f"http://127.0.0.1:{free_port()}").generate(prompt="x")


def test_stream_generate_deltas_add_up_to_the_full_result(llama_server) -> None:
    client = InferenceHTTPClient(llama_server.url)
    params = {"temperature": 0.0, "max_new_tokens": 12}
    full = client.generate(prompt="Hello there", sampling_params=params)
    deltas = list(client.stream_generate(prompt="Hello there", sampling_params=params,
                                         return_logprob=True))
    assert "".join(d["text"] for d in deltas) == full["text"]
    assert [t for d in deltas for t in d["output_ids"]] == full["output_ids"]
    assert sum(len(d["output_token_logprobs"]) for d in deltas) == 12

    async def collect() -> list[dict]:
        async with InferenceHTTPClient(llama_server.url) as c:
            return [d async for d in c.async_stream_generate(prompt="Hello there",
                                                             sampling_params=params)]

    assert "".join(d["text"] for d in asyncio.run(collect())) == full["text"]


def test_generate_many_keeps_input_order(llama_server, capsys) -> None:
    client = InferenceHTTPClient(llama_server.url)
    ids = [[5 + i, 6, 7] for i in range(40)]
    results = client.generate_many(input_ids=ids, sampling_params={"max_new_tokens": 2},
                                   max_concurrency=7, progress=True)
    singles = [client.generate(input_ids=i, sampling_params={"max_new_tokens": 2,
                               "temperature": 0.0}) for i in ids[:3]]
    assert len(results) == 40
    assert [r["meta_info"]["prompt_tokens"] for r in results] == [3] * 40
    assert all(r["meta_info"]["completion_tokens"] == 2 for r in results)
    assert singles[0]["meta_info"]["prompt_tokens"] == 3
    assert "40/40" in capsys.readouterr().err


def test_proxy_variables_do_not_capture_loopback(llama_server, monkeypatch) -> None:
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = InferenceHTTPClient(llama_server.url)
    assert client.health()
    assert client.generate(prompt="a", sampling_params=GREEDY)["output_ids"]
    assert asyncio.run(client.async_health())


class _FlakyHandler:
    """A loopback HTTP server that answers 503 twice, then 200: the failure retries exist
    for (a router or engine restarting), which a healthy real server never produces."""

    @staticmethod
    def serve() -> tuple[object, str]:
        import http.server
        import json
        import threading

        answers = iter([503, 503, 200, 200, 200, 200])

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                status = next(answers)
                body = json.dumps({"text": "ok"} if status == 200 else
                                  {"error": {"message": "restarting"}}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_retries_ride_out_503s_and_give_up_when_told() -> None:
    server, url = _FlakyHandler.serve()
    try:
        with pytest.raises(InferenceHTTPError) as err:
            InferenceHTTPClient(url).generate(prompt="x")  # no retries by default
        assert err.value.status == 503 and err.value.message == "restarting"
        client = InferenceHTTPClient(url, max_retries=2, retry_backoff=0.01)
        assert client.generate(prompt="x") == {"text": "ok"}  # one 503 left, then 200
    finally:
        server.shutdown()
        server.server_close()


def test_chat_streaming_sync_and_async_match_the_full_reply(llama_server) -> None:
    client = InferenceHTTPClient(llama_server.url)
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat_completion(messages, temperature=0.0, max_tokens=10)
    text = full["choices"][0]["message"]["content"]
    chunks = list(client.stream_chat_completion(messages, temperature=0.0, max_tokens=10))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    async def collect() -> str:
        async with InferenceHTTPClient(llama_server.url) as c:
            return "".join([ch["choices"][0]["delta"].get("content") or ""
                            async for ch in c.async_stream_chat_completion(
                                messages, temperature=0.0, max_tokens=10)])

    assert asyncio.run(collect()) == text
