"""The launcher's args block (seed 004's `router_server_args`): engines, router, and checks.

The `server:` block is forwarded as `ServerArgs(**server)` and the `router:` block as
sglang-router flags; both are checked here, before anything starts. Other keys in the
block are ignored, so a runner can hand over a larger sub-config (`cfg.rollout`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rollserve.cluster.router import router_flags
from rollserve.models.catalog import DEFAULT_MODEL, resolve_model
from rollserve.utils.process import command_flags

SERVER_TYPES = ("rollserve", "sglang")
RUNTIME_KEYS = ("host", "port", "dist_init_addr")  # filled in by the launcher


@dataclass(slots=True)
class FleetArgs:
    model_path: str = DEFAULT_MODEL  # a directory, a .gguf file or a name (`rollserve models`)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    group_name: str = "RolloutServerGroup"
    launch_server: bool = True
    server: dict[str, Any] = field(default_factory=dict)
    router_group_name: str = "RouterGroup"
    launch_router: bool = True
    router: dict[str, Any] = field(default_factory=dict)
    server_type: str = "rollserve"
    startup_timeout_secs: float = 600.0
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if self.server_type not in SERVER_TYPES:
            raise ValueError(f"server_type must be one of {', '.join(SERVER_TYPES)}, "
                             f"got {self.server_type!r}")
        self.server = {k: v for k, v in self.server.items() if v is not None}
        self.server.setdefault("model_path", self.model_path)
        preset = [k for k in RUNTIME_KEYS if k in self.server]
        if preset:
            raise ValueError(f"server.{preset[0]} is filled in by the launcher at run time; "
                             "leave it out of the config")
        self.server.setdefault("tp_size", self.tensor_parallel_size)
        if self.server_type == "rollserve" and self.pipeline_parallel_size != 1:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size}: rollserve "
                             "engines do not run pipeline parallelism; use 1 (and "
                             "tensor_parallel_size for more ranks per engine)")
        if self.server_type == "rollserve":
            _check_rollserve_server(self.server)  # a first use converts the model, here once
        else:
            _check_sglang_server(self.server)
            self.server["model_path"] = resolve_model(self.server["model_path"])
        self.router_command("127.0.0.1", 0, 0)  # validates the router block now

    @classmethod
    def from_config(cls, block: Any) -> FleetArgs:
        data = _plain(block)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def ranks_per_engine(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def server_command(self, host: str, port: int, dist_init_addr: str | None) -> list[str]:
        module = ("rollserve.launch_server" if self.server_type == "rollserve"
                  else "sglang.launch_server")
        runtime = {"host": host, "port": port, "dist_init_addr": dist_init_addr}
        options = {**self.server, **runtime}
        return [sys.executable, "-m", module,
                *command_flags({"--" + k.replace("_", "-"): v for k, v in options.items()})]

    def router_command(self, host: str, port: int, metrics_port: int) -> list[str]:
        """The router's command line. Its Prometheus exporter gets its own port too (its
        fixed default would collide with any other router on the node)."""
        router = {"prometheus_port": metrics_port, "prometheus_host": host, **self.router,
                  "host": host, "port": port}
        return [sys.executable, "-m", "sglang_router.launch_router", *router_flags(router)]


def _check_rollserve_server(server: dict[str, Any]) -> None:
    from rollserve.server.args import ServerArgs

    try:
        ServerArgs(**server)
    except TypeError as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(ServerArgs))
        raise TypeError(f"router_server_args.server: {exc}; valid ServerArgs fields: "
                        f"{valid}") from None


def _check_sglang_server(server: dict[str, Any]) -> None:
    if importlib.util.find_spec("sglang") is None:
        raise ImportError("server_type: sglang starts `python -m sglang.launch_server`, but "
                          "sglang is not installed here (pip install sglang, on GPU nodes); "
                          "use server_type: rollserve otherwise")
    from sglang.srt.server_args import ServerArgs as SGLangServerArgs

    valid = {f.name for f in dataclasses.fields(SGLangServerArgs)}
    unknown = sorted(set(server) - valid)
    if unknown:
        raise TypeError(f"router_server_args.server: unknown sglang ServerArgs field(s) "
                        f"{', '.join(unknown)}")


def _plain(block: Any) -> dict[str, Any]:
    """A DictConfig (interpolations resolved) or mapping -> plain nested dicts/lists."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(block, DictConfig):
        return OmegaConf.to_container(block, resolve=True)  # type: ignore[return-value]
    if isinstance(block, Mapping):
        return dict(block)
    raise TypeError(f"router_server_args must be a mapping, got {type(block).__name__}")
