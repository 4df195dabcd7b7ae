"""Importing rollserve leaves torch unloaded, so a process (the test suite's conftest) can
still set libgomp's environment, which it reads when torch loads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_importing_the_package_does_not_import_torch() -> None:
    """The package's imports only: a sitecustomize on PYTHONPATH (the AVX2 emulation of the
    benchmarks installs one that imports torch) is the interpreter's start-up, left out."""
    code = ("import sys, rollserve, rollserve.utils.process, rollserve.cli; "
            "print('torch' in sys.modules)")
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and not (Path(p) / "sitecustomize.py").is_file()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, env=env)
    assert done.stdout.strip() == "False"


def test_package_exports_load_on_first_use() -> None:
    import rollserve

    assert rollserve.Engine.__name__ == "Engine"
    assert rollserve.ServerArgs.__name__ == "ServerArgs"
    assert {"Engine", "EngineArgs", "SamplingParams", "ServerArgs"} <= set(dir(rollserve))
    with pytest.raises(AttributeError, match="NoSuchName"):
        rollserve.NoSuchName  # noqa: B018
