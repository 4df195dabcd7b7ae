"""Engine processes set libgomp's spin count before torch loads it (rollserve.openmp_spin)."""

from __future__ import annotations

import os
import subprocess
import sys

from rollserve.openmp_spin import ENGINE_SPIN_COUNT, configure_engine_process

# Records GOMP_SPINCOUNT at the moment torch is first imported, then runs the server entry
# point as far as its argument parsing (--help exits there).
SPIN_AT_TORCH_IMPORT = """
import os, sys
seen = []
def on_import(event, args):
    if event == "import" and args[0] == "torch" and not seen:
        seen.append(os.environ.get("GOMP_SPINCOUNT"))
sys.addaudithook(on_import)
import rollserve.launch_server as entry
try:
    entry.main(["--help"])
except SystemExit:
    pass
print(seen)
"""


def _spin_at_torch_import(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", SPIN_AT_TORCH_IMPORT], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_server_entry_sets_the_spin_count_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _spin_at_torch_import(env) == f"['{ENGINE_SPIN_COUNT}']"


def test_a_spin_count_set_by_the_user_wins() -> None:
    assert _spin_at_torch_import({**os.environ, "GOMP_SPINCOUNT": "77"}) == "['77']"


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, rollserve, rollserve.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_configure_defaults_only_an_unset_spin_count(monkeypatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    configure_engine_process()
    assert os.environ["GOMP_SPINCOUNT"] == str(ENGINE_SPIN_COUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    configure_engine_process()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
