"""The server in process, over a real engine: `/health` answers 503 until the warm-up
generation succeeded, an engine that cannot generate stops the server instead, and a failure
after a stream has begun ends it with an error event."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
import uvicorn
from starlette.testclient import TestClient

from rollserve import Engine, ServerArgs
from rollserve.server.app import build_app
from rollserve.server.launch import _Server, _warm_up


@pytest.fixture
def engine(llama_path):
    with Engine(str(llama_path), device="cpu", dtype="float32", max_total_tokens=1024) as engine:
        yield engine


def _server_for(engine: Engine, args: ServerArgs):
    app = build_app(engine, args)
    return app, _Server(uvicorn.Config(app), engine)


def test_health_is_503_until_the_warm_up_generation_succeeds(engine, llama_path) -> None:
    args = ServerArgs(model_path=str(llama_path), device="cpu", dtype="float32")
    app, server = _server_for(engine, args)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        asyncio.run(_warm_up(app, server, args))
        assert client.get("/health").status_code == 200
    assert not server.should_exit


def test_failed_warm_up_stops_the_server_instead_of_answering_503_forever(
    engine, llama_path, caplog
) -> None:
    args = ServerArgs(model_path=str(llama_path), device="cpu", dtype="float32")
    app, server = _server_for(engine, args)
    # A real fault in the engine step: the embedding loses all rows but two, so the warm-up
    # prompt's token ids index past it and the step raises.
    embed = engine.model.model.embed_tokens
    embed.weight = torch.nn.Parameter(embed.weight[:2].clone())
    asyncio.run(_warm_up(app, server, args))
    assert server.warm_up_failed and server.should_exit
    assert not app.state.server.ready
    assert "engine warm-up failed" in caplog.text


def test_server_args_check_chat_template_and_preferred_sampling_params(tmp_path,
                                                                      llama_path) -> None:
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        ServerArgs(model_path="m", chat_template="chatml")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert ServerArgs(model_path=str(llama_path), chat_template=str(template)).chat_template
    long_inline = "{{ messages[0]['content'] }}" + " " * 300  # no valid file name
    assert ServerArgs(model_path=str(llama_path), chat_template=long_inline)
    with pytest.raises(ValueError, match="tempreature"):
        ServerArgs(model_path="m", preferred_sampling_params='{"tempreature": 0.5}')
    with pytest.raises(ValueError, match="top_p"):
        ServerArgs(model_path="m", preferred_sampling_params='{"top_p": 3}')


def test_server_args_are_the_engine_args_plus_the_servers_own(llama_path) -> None:
    import dataclasses

    from rollserve import EngineArgs
    from rollserve.server.args import build_parser

    engine_fields = [f.name for f in dataclasses.fields(EngineArgs)]
    server_fields = [f.name for f in dataclasses.fields(ServerArgs)]
    assert server_fields[:len(engine_fields)] == engine_fields
    args = ServerArgs.from_cli(["--model-path", str(llama_path), "--max-total-tokens", "512",
                                "--dtype", "float32", "--api-key", "k", "--port", "1234"])
    assert args.engine_args() == EngineArgs(model_path=str(llama_path), max_total_tokens=512,
                                            dtype="float32")
    assert type(args.engine_args()) is EngineArgs  # no server settings reach the engine
    defaults = build_parser().parse_args([])
    for field in dataclasses.fields(ServerArgs):
        assert getattr(defaults, field.name) == field.default
    with pytest.raises(ValueError, match="schedule_policy"):  # EngineArgs' own validation
        ServerArgs(model_path=str(llama_path), schedule_policy="random")


def test_failure_after_a_stream_began_ends_it_with_an_error_event(engine, llama_path,
                                                                  monkeypatch) -> None:
    from rollserve.server import openai_protocol

    args = ServerArgs(model_path=str(llama_path), device="cpu", dtype="float32")
    app, _ = _server_for(engine, args)

    def broken(output: dict) -> str:
        raise RuntimeError("framing bug")

    # A bug in framing the last chunk: the role and content chunks have gone out by then.
    monkeypatch.setattr(openai_protocol, "finish_reason", broken)
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200
        assert json.loads(lines[0][5:])["object"] == "chat.completion.chunk"
        assert lines[-1] == "data: [DONE]"
        assert "framing bug" in json.loads(lines[-2][5:])["error"]["message"]
        served = client.post("/generate", json={"input_ids": [1, 2, 3],
                                                "sampling_params": {"max_new_tokens": 2}})
        assert len(served.json()["output_ids"]) == 2
