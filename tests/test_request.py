"""Req's per-step accessors agree with fill_ids (prompt, then outputs) without copying it."""

from __future__ import annotations

from rollserve.engine.request import Req
from rollserve.engine.sampling_params import SamplingParams


def make_req(prompt: list[int], outputs: list[int]) -> Req:
    req = Req("r", prompt, SamplingParams.from_dict({}), None, lambda _req: None)
    req.output_ids.extend(outputs)
    return req


def test_seq_len_last_token_and_fill_range_match_fill_ids() -> None:
    for outputs in ([], [7], [7, 8, 9]):
        req = make_req([1, 2, 3, 4], outputs)
        ids = req.fill_ids
        assert req.seq_len == len(ids)
        assert req.last_token == ids[-1]
        for start in range(len(ids) + 1):
            for end in range(start, len(ids) + 2):
                assert req.fill_range(start, end) == ids[start:end], (outputs, start, end)
