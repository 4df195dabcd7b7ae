"""`rollserve` console script: `rollserve --help` lists the commands."""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: rollserve COMMAND [ARGS ...]

commands:
  demo [key=value ...]    the main job with a workload: a local Ray, two engines of the default
                          model behind the sglang-router, a few chat questions and a rollout
                          workload through the router, a summary; then everything stops
  launch [key=value ...]  engines + router from the Hydra config (seed 004), serving until
                          Ctrl-C; `rollserve launch --cfg job` prints the config
  serve [--flags ...]     one engine server (python -m rollserve.launch_server; SGLang's flags,
                          `rollserve serve --help` lists them)
  models                  the models rollserve knows by name (the default is
                          smollm2-135m-instruct); a .gguf file or an HF checkpoint directory
                          works wherever a model is asked for
"""

COMMANDS = {
    "launch": ("rollserve.cluster.job", []),
    "demo": ("rollserve.cluster.job", ["demo=true"]),
    "serve": ("rollserve.launch_server", []),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if command == "models":
        from rollserve.models.catalog import models_table

        print(models_table())
        return
    if command not in COMMANDS:
        sys.exit(f"rollserve: unknown command {command!r}\n\n{USAGE}")
    module, preset = COMMANDS[command]
    importlib.import_module(module).main([*preset, *argv[1:]])


if __name__ == "__main__":
    main()
