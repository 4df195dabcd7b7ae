"""`rollserve` console script: `rollserve demo [...]`, `rollserve serve --model-path ...`."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "rollserve.demo",
    "serve": "rollserve.launch_server",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "demo"
    if command not in COMMANDS:
        sys.exit(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    import importlib

    importlib.import_module(COMMANDS[command]).main(argv[1:])


if __name__ == "__main__":
    main()
