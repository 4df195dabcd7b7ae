"""`python -m rollserve.launch_server --model-path PATH [--port 30000] ...` (SGLang's flags)."""

from __future__ import annotations

from rollserve.server.args import ServerArgs
from rollserve.server.launch import launch_server


def main(argv: list[str] | None = None) -> None:
    launch_server(ServerArgs.from_cli(argv))


if __name__ == "__main__":
    main()
