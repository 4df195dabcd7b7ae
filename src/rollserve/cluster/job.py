"""`rollserve launch [overrides]`: the main job. Engines + router from a Hydra config.

Starts (or joins) Ray, places the engines named by `component` in the config, starts the
router, prints where everything runs, then serves until Ctrl-C — or, with `demo=true`, fans
a demo workload through the router, prints a summary and stops. Everything it started is
stopped on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import hydra
from omegaconf import DictConfig
from ray.exceptions import GetTimeoutError

from rollserve.cluster import Cluster, ComponentPlacement, launch_router_and_servers
from rollserve.cluster.config import CONFIG_NAME, register_resolvers
from rollserve.cluster.handles import RouterGroup, ServerGroup

register_resolvers()  # before Hydra composes the config


def run(cfg: DictConfig) -> None:
    if cfg.demo and not (cfg.router_server_args.launch_router
                         and cfg.router_server_args.launch_server):
        raise ValueError("demo=true sends its workload through the router to the engines: "
                         "it needs launch_router and launch_server")
    cluster = Cluster(cluster_cfg=cfg.cluster)
    servers = router = None
    try:
        placement = ComponentPlacement(cfg, cluster)
        servers, router = launch_router_and_servers(
            cfg, cluster, rollout_hardware_ranks=placement.get_hardware_ranks(cfg.component),
            router_server_args=cfg.router_server_args,
            rollout_node_group=placement.get_node_group(cfg.component),
        )
        print_status(servers, router)
        if cfg.demo:
            from rollserve.cluster.demo import run_demo

            run_demo(router.get_router_url().wait()[0], servers, cfg.demo_requests,
                     cfg.demo_max_new_tokens)
        else:
            _serve_until_interrupted()
    finally:
        for group in (router, servers):
            if group is not None:
                _stop(group)
        cluster.shutdown()


def _stop(group: RouterGroup | ServerGroup) -> None:
    """Stop a group's processes, waiting a bounded time: after a Ctrl-C to the whole process
    group, Ray itself may be going down, and its answers may never come (the processes have
    Linux's parent-death signal, so they stop with their Ray workers anyway)."""
    try:
        group.shutdown().wait(timeout=40)
    except GetTimeoutError:
        print(f"{group.name}: no answer from Ray within 40 s while stopping", file=sys.stderr)


def print_status(servers: ServerGroup | None, router: RouterGroup | None) -> None:
    engines = servers.engines if servers is not None else []
    healthy = servers.is_healthy().wait() if servers is not None else []
    print(f"\n{'engine':<24}{'url':<28}{'node':>5}  {'device':<18}{'healthy':>8}")
    for engine, ok in zip(engines, healthy, strict=True):
        print(f"{engine.name:<24}{engine.url:<28}{engine.node_rank:>5}  {engine.device:<18}"
              f"{'yes' if ok else 'NO':>8}")
    if router is not None:
        print(f"\nrouter: {router.get_router_url().wait()[0]}  (node {router.node_rank})")
    if engines:
        print(f"logs: {os.path.dirname(engines[0].log_path)}")
    sys.stdout.flush()


def _serve_until_interrupted() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("serving; Ctrl-C stops the fleet", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


@hydra.main(version_base="1.3", config_path="configs", config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: Hydra reads its overrides from sys.argv."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # Ctrl-C (SIGINT) stops the fleet even where the driver inherited it ignored: a shell
    # starts a script's background jobs (`rollserve launch &`) with SIGINT ignored, and
    # Python then never raises KeyboardInterrupt; uvicorn and SGLang's servers do the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _hydra_main()


if __name__ == "__main__":
    main()
