"""`--emulate-isa avx2` of the benchmarks (bench.emulated_isa): both engines keep to AVX2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rollserve.bench import emulated_isa
from rollserve.kernels.build import runnable_isas

PROBES = ("import os, torch; print(torch.cpu._is_avx512_supported(), "
          "torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_vnni_supported(), "
          "torch.cpu._is_amx_tile_supported(), "
          "torch.cpu._is_avx2_supported(), torch.backends.cpu.get_cpu_capability(), "
          "os.environ.get('SHADOWED_SITECUSTOMIZE'))")


def _clear_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [*emulated_isa.SETTINGS["avx2"], emulated_isa.MARKER]:
        monkeypatch.delenv(key, raising=False)


def test_without_the_settings_nothing_is_emulated(monkeypatch) -> None:
    _clear_settings(monkeypatch)
    assert emulated_isa.emulated() is None


def test_the_settings_typed_by_hand_are_not_taken_for_the_emulation(monkeypatch) -> None:
    """Without the sitecustomize the probes still report AVX-512: the benchmark re-runs."""
    _clear_settings(monkeypatch)
    for key, value in emulated_isa.SETTINGS["avx2"].items():
        monkeypatch.setenv(key, value)
    assert emulated_isa.emulated() is None


@pytest.mark.skipif("avx2" not in runnable_isas(), reason="this CPU does not run AVX2")
def test_every_process_of_the_emulation_sees_avx2_and_no_avx512_or_amx(
    monkeypatch, tmp_path
) -> None:
    _clear_settings(monkeypatch)
    monkeypatch.setenv("ROLLSERVE_CACHE", str(tmp_path))
    # A sitecustomize already on the path (a distribution's, a venv's) still runs after the
    # emulation's, which shadows it; the emulation's folder listed again, under another name,
    # does not make it run itself in turn.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "sitecustomize.py").write_text(
        "import os\nos.environ['SHADOWED_SITECUSTOMIZE'] = 'ran'\n")
    (tmp_path / "emulated-isa").mkdir()
    (tmp_path / "again").symlink_to(tmp_path / "emulated-isa")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "again"), str(kept)]))
    env = emulated_isa.emulation_env("avx2")
    assert env["PYTHONPATH"].split(os.pathsep)[2:] == [str(kept)]
    done = subprocess.run([sys.executable, "-c", PROBES], env=env, capture_output=True,
                          text=True, check=True)
    assert "Error in sitecustomize" not in done.stderr, done.stderr
    assert done.stdout.split() == ["False"] * 4 + ["True", "AVX2", "ran"]
    monkeypatch.setattr(os, "environ", env)
    assert emulated_isa.emulated() == "avx2"


@pytest.mark.skipif("avx2" not in runnable_isas(), reason="this CPU does not run AVX2")
def test_the_offline_benchmark_reruns_itself_with_every_engine_setting(
    monkeypatch, tiny_model_factory
) -> None:
    _clear_settings(monkeypatch)
    done = subprocess.run(
        [sys.executable, "-m", "rollserve.bench.offline", "--emulate-isa", "avx2",
         "--model-path", str(tiny_model_factory("qwen2", dtype="bfloat16")),
         "--num-prompts", "2", "--prompt-len", "4", "8", "--output-len", "2", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("emulating avx2: re-running with ROLLSERVE_CPU_ISA=avx2 ")
    assert "EMULATING avx2 only (ROLLSERVE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 " \
           "ONEDNN_MAX_CPU_ISA=AVX2 and torch.cpu's AVX-512/AMX probes" in done.stdout
    # the checkpoint is bfloat16: `auto` computes in float32, as without AVX512-BF16 or AMX
    assert "(float32, cpu)" in done.stdout
    assert "rollserve                           2" in done.stdout
