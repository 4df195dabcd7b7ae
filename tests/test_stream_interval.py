"""stream_interval (SGLang's --stream-interval): a streamed request reports its first token,
every stream_interval-th, and its finish; the default reports every token."""

from __future__ import annotations

import asyncio

import pytest

from rollserve import Engine, ServerArgs

TEN_TOKENS = {"max_new_tokens": 10, "temperature": 0.0, "ignore_eos": True}


def streamed_lengths(engine: Engine, params: dict) -> list[int]:
    async def collect() -> list[int]:
        updates = engine.async_stream(input_ids=[5, 6, 7], sampling_params=params)
        return [len(output["output_ids"]) async for _, output, _ in updates]
    return asyncio.run(collect())


@pytest.mark.parametrize(("interval", "expected"), [
    (1, list(range(1, 11))),
    (4, [1, 4, 8, 10]),
    (5, [1, 5, 10]),
])
def test_stream_reports_first_every_nth_and_last_token(llama_path, interval: int,
                                                         expected: list[int]) -> None:
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=1024,
                stream_interval=interval) as engine:
        assert streamed_lengths(engine, TEN_TOKENS) == expected
        final = engine.generate(input_ids=[5, 6, 7], sampling_params=TEN_TOKENS)
        assert len(final["output_ids"]) == 10


def test_stream_is_a_plain_iterator_and_leaving_it_early_aborts_the_request(
        llama_path) -> None:
    with Engine(str(llama_path), dtype="float32", device="cpu", max_total_tokens=1024,
                stream_interval=2) as engine:
        updates = [(index, len(output["output_ids"]), finished) for index, output, finished
                   in engine.stream(input_ids=[[5, 6, 7], [8, 9]], sampling_params=TEN_TOKENS)]
        assert sorted(updates) == [(i, n, n == 10) for i in (0, 1) for n in (1, 2, 4, 6, 8, 10)]
        endless = {**TEN_TOKENS, "max_new_tokens": 500}
        for _, output, _ in engine.stream(input_ids=[5, 6, 7], sampling_params=endless):
            if len(output["output_ids"]) >= 2:
                break
        final = engine.generate(input_ids=[5, 6, 7], sampling_params=TEN_TOKENS)
        assert len(final["output_ids"]) == 10
        assert engine.stats()["num_running_reqs"] == 0  # the abandoned request was aborted
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.stream(input_ids=[5], sampling_params={"max_new_tokens": -1})


def test_stream_interval_below_one_is_refused_by_engine_and_server_args(llama_path) -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        Engine(str(llama_path), stream_interval=0)
    with pytest.raises(ValueError, match="stream_interval"):
        ServerArgs(model_path=str(llama_path), stream_interval=0)


def test_stream_interval_flag_reaches_the_engine_args(llama_path) -> None:
    args = ServerArgs.from_cli(["--model-path", str(llama_path), "--stream-interval", "8"])
    assert args.stream_interval == 8
    assert args.engine_args().stream_interval == 8
