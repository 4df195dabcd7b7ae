"""Importing rollserve leaves torch unloaded, so a process (the test suite's conftest) can
still set libgomp's environment, which it reads when torch loads it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_the_package_does_not_import_torch() -> None:
    code = ("import sys, rollserve, rollserve.utils.process, rollserve.cli; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_package_exports_load_on_first_use() -> None:
    import rollserve

    assert rollserve.Engine.__name__ == "Engine"
    assert rollserve.ServerArgs.__name__ == "ServerArgs"
    assert {"Engine", "EngineArgs", "SamplingParams", "ServerArgs"} <= set(dir(rollserve))
    with pytest.raises(AttributeError, match="NoSuchName"):
        rollserve.NoSuchName  # noqa: B018
