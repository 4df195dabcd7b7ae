"""`python -m rollserve.launch_server --model-path PATH [--port 30000] ...` (SGLang's flags)."""

from __future__ import annotations

from rollserve.openmp_spin import configure_engine_process


def main(argv: list[str] | None = None) -> None:
    configure_engine_process()
    # Imported here, after the OpenMP setting: these load torch.
    from rollserve.server.args import ServerArgs
    from rollserve.server.launch import launch_server

    launch_server(ServerArgs.from_cli(argv))


if __name__ == "__main__":
    main()
