"""`python -m rollserve.bench.offline --repeats N`: N interleaved rounds, each engine run in a
fresh process, and the figures of the median one (the issue's targets are medians of
interleaved runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from rollserve.bench.offline import in_fresh_process

# round, rollserve s, prefill / decode s, rollserve GiB, peer s, speedup, batch-1 of floor
ROUND_ROW = re.compile(r"^ +(\d) +([\d.]+) +[\d.]+ / [\d.]+ +[\d.]+ +[\d.]+ +([\d.]+) +[\d.-]+$",
                       re.MULTILINE)


def _offline(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rollserve.bench.offline", *options],
                          capture_output=True, text=True, timeout=300)


def test_repeated_rounds_print_each_round_and_the_median_one(tiny_model_factory) -> None:
    done = _offline("--model-path", str(tiny_model_factory("llama")), "--num-prompts", "2",
                    "--prompt-len", "4", "8", "--output-len", "2", "4", "--compare", "hf",
                    "--repeats", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    progress = re.findall(r"^round (\d) of 3( \(the peer first\))?: rollserve ", done.stdout,
                          re.MULTILINE)
    assert progress == [("1", ""), ("2", " (the peer first)"), ("3", "")], done.stdout
    rows = {int(number): (seconds, float(speedup))
            for number, seconds, speedup in ROUND_ROW.findall(done.stdout)}
    assert sorted(rows) == [1, 2, 3], done.stdout
    median = sorted(rows, key=lambda number: rows[number][1])[1]
    assert f"the figures below are the median round's (round {median})" in done.stdout
    # the results table is that round's, and so is the ratio
    table = re.findall(r"^rollserve +2 +\d+ +([\d.]+) ", done.stdout, re.MULTILINE)
    assert table == [rows[median][0]], done.stdout
    assert f"speedup_vs_hf: {rows[median][1]:.2f} (median of 3 rounds)" in done.stdout


def test_a_round_runs_in_a_process_of_its_own() -> None:
    assert in_fresh_process(os.getpid) != os.getpid()


def test_an_even_or_empty_count_of_rounds_is_refused() -> None:
    for repeats in ("0", "2"):
        done = _offline("--repeats", repeats)
        assert done.returncode == 2
        assert "--repeats must be odd" in done.stderr
