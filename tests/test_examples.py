"""The examples run as users run them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_rl_loop_trains_and_keeps_engines_in_step_with_the_trainer() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "rl_loop.py"), "--steps", "3", "--prompts-per-step",
         "2", "--samples-per-prompt", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.e+-]+)\s+([\d.]+)$", result.stdout,
                      re.MULTILINE)
    assert [int(step) for step, *_ in rows] == [0, 1, 2]
    # Each step's rollouts came from the weights pushed after the previous step.
    assert all(float(gap) < 1e-3 for _, _, gap, _ in rows)
