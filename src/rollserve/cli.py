"""`rollserve` console script.

`rollserve launch [overrides]`  engines + router from a Hydra config (the main job)
`rollserve demo [overrides]`    the same with `demo=true`: a rollout workload and a summary
`rollserve serve --model-path`  one engine server (`python -m rollserve.launch_server`)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "launch": ("rollserve.launch", []),
    "demo": ("rollserve.launch", ["demo=true"]),
    "serve": ("rollserve.launch_server", []),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "demo"
    if command not in COMMANDS:
        sys.exit(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    module, preset = COMMANDS[command]
    importlib.import_module(module).main([*preset, *argv[1:]])


if __name__ == "__main__":
    main()
