"""`python -m rollserve.bench.offline --repeats N`: N interleaved rounds, and the figures of
the median one (the issue's targets are medians of interleaved runs)."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys


def _offline(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rollserve.bench.offline", *options],
                          capture_output=True, text=True, timeout=300)


def test_repeated_rounds_print_each_round_and_the_median_speedup(tiny_model_factory) -> None:
    done = _offline("--model-path", str(tiny_model_factory("llama")), "--num-prompts", "2",
                    "--prompt-len", "4", "8", "--output-len", "2", "4", "--compare", "hf",
                    "--repeats", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    # round, rollserve s, prefill / decode s, peak GiB, peer s, speedup, batch-1 of floor
    rows = re.findall(r"^ +(\d) +[\d.]+ +[\d.]+ / [\d.]+ +[\d.]+ +[\d.]+ +([\d.]+) +[\d.-]+$",
                      done.stdout, re.MULTILINE)
    assert [number for number, _ in rows] == ["1", "2", "3"], done.stdout
    speedups = [float(speedup) for _, speedup in rows]
    final = re.search(r"^speedup_vs_hf: ([\d.]+) \(median of 3 rounds\)$", done.stdout,
                      re.MULTILINE)
    assert final is not None, done.stdout
    assert float(final.group(1)) == statistics.median(speedups)
    # a progress line a round, then the median round's table
    assert len(re.findall(r"^round \d of 3: rollserve ", done.stdout, re.MULTILINE)) == 3
    assert len(re.findall(r"^hf-transformers \(batch 32\) ", done.stdout, re.MULTILINE)) == 1


def test_fewer_than_one_round_is_refused() -> None:
    done = _offline("--repeats", "0")
    assert done.returncode == 2
    assert "--repeats must be at least 1" in done.stderr
