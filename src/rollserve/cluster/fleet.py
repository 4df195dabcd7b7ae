"""`launch_router_and_servers`: engine servers on their nodes, one router, registration.

Order (seed 004): repack the hardware ranks into one engine per tp x pp ranks, start every
engine in parallel (one Ray actor each, pinned to its node), start the router with no
workers on `router_node_rank`, then register each engine and block until the router reports
it healthy. Any failure stops everything this call started and raises `FleetLaunchError`
naming each failed component with the tail of its log.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rollserve.cluster.args import FleetArgs
from rollserve.cluster.cluster import Cluster, NodeInfo
from rollserve.cluster.handles import EngineInfo, RouterGroup, ServerGroup
from rollserve.cluster.placement import PlacementStrategy, packed_strategy
from rollserve.cluster.workers import EngineServerActor, RouterActor, Started


class FleetLaunchError(RuntimeError):
    """An engine or the router failed to start; everything started was stopped."""


@dataclass(slots=True, frozen=True)
class EngineSlot:
    """One engine's place: a node and the hardware ranks it owns there."""

    name: str
    node: NodeInfo
    local_ranks: tuple[int, ...]
    env_vars: Mapping[str, str]

    def device_env(self) -> tuple[dict[str, str], list[int] | None, str]:
        """(environment, CPU core ids to pin or None, description) for the engine process."""
        env = dict(self.env_vars)
        if self.node.has_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.local_ranks))
            return env, None, f"cuda:{env['CUDA_VISIBLE_DEVICES']}"
        # dict.fromkeys: ranks that share a core (more ranks than cores) list it once
        cores = list(dict.fromkeys(c for r in self.local_ranks for c in self.node.cpu_cores(r)))
        return env, cores, f"cpu cores {','.join(map(str, cores))}"


def launch_router_and_servers(
    cfg: Any, cluster: Cluster, rollout_hardware_ranks: Sequence[int] | None,
    router_server_args: Any, *, rollout_node_group: str | Sequence[str] | None = None,
    placement_strategy: PlacementStrategy | None = None, router_node_rank: int = 0,
) -> tuple[ServerGroup | None, RouterGroup | None]:
    """Starts the engines and the router; returns `(server_group, router_group)`.

    `placement_strategy`, when given, is used as it is (each process = one engine of
    tp x pp ranks) and `rollout_hardware_ranks` is ignored; otherwise the ranks must be
    contiguous. A group whose `launch_server` / `launch_router` is false comes back None.
    """
    args = FleetArgs.from_config(router_server_args)
    log_dir = args.log_dir or _config_log_dir(cfg) or tempfile.mkdtemp(prefix="rollserve-")
    servers: ServerGroup | None = None
    router: RouterGroup | None = None
    try:
        if args.launch_server:
            strategy = placement_strategy or packed_strategy(
                rollout_hardware_ranks or [], args.ranks_per_engine, rollout_node_group)
            servers = _start_servers(plan_engines(cluster, strategy, args), args, log_dir)
        if args.launch_router:
            router = _start_router(cluster.get_node(router_node_rank), args, log_dir)
            if servers is not None:
                registrations = [router.register_server(e.url, args.startup_timeout_secs)
                                 for e in servers.engines]
                for registration in registrations:
                    registration.wait()
    except BaseException:
        for group in (router, servers):
            if group is not None:
                group.shutdown().wait()
        raise
    return servers, router


launch_sglang_router_and_server = launch_router_and_servers  # seed 004's name


def plan_engines(cluster: Cluster, strategy: PlacementStrategy,
                 args: FleetArgs) -> list[EngineSlot]:
    group = cluster.get_node_group(strategy.node_group)
    slots = []
    for index, ranks in enumerate(strategy.process_ranks):
        if len(ranks) != args.ranks_per_engine:
            raise ValueError(f"placement process {index} has {len(ranks)} hardware ranks, but "
                             f"an engine needs tp x pp = {args.ranks_per_engine}")
        located = [group.locate(rank) for rank in ranks]
        nodes = {node.rank for node, _ in located}
        if len(nodes) > 1:
            raise ValueError(f"engine {index}: hardware ranks {list(ranks)} span nodes "
                             f"{sorted(nodes)}; an engine must sit on one node")
        slots.append(EngineSlot(f"{args.group_name}-{index}", located[0][0],
                                tuple(local for _, local in located), group.env_vars))
    return slots


def _start_servers(slots: list[EngineSlot], args: FleetArgs, log_dir: str) -> ServerGroup:
    actors, refs, devices = [], [], []
    for slot in slots:
        env, cores, device = slot.device_env()
        actor = _on_node(EngineServerActor, slot.node).remote(slot.name, log_dir, slot.node.ip)
        actors.append(actor)
        devices.append(device)
        refs.append(actor.launch.remote(args, env, cores, args.startup_timeout_secs))
    results = _gather(refs, args.startup_timeout_secs, [s.name for s in slots], actors)
    engines = [EngineInfo(r.name, r.url or "", s.node.rank, s.node.ip, s.local_ranks, d,
                          r.log_path) for r, s, d in zip(results, slots, devices, strict=True)]
    group = ServerGroup(args.group_name, actors, engines)
    _raise_failures(results, group)
    return group


def _start_router(node: NodeInfo, args: FleetArgs, log_dir: str) -> RouterGroup:
    name = f"{args.router_group_name}-0"
    actor = _on_node(RouterActor, node).remote(name, log_dir, node.ip)
    result = _gather([actor.launch.remote(args, args.startup_timeout_secs)],
                     args.startup_timeout_secs, [name], [actor])[0]
    group = RouterGroup(args.router_group_name, actor, result.url or "", node.rank)
    _raise_failures([result], group)
    return group


def _gather(refs: list[ray.ObjectRef], timeout: float, names: list[str],
            actors: list[Any]) -> list[Started]:
    """The launch results; an actor that never got scheduled (its node is gone or full)
    fails after the start-up timeout plus a grace period instead of hanging the driver. Any
    failure (a launch that raised too) kills every actor of this launch, and with them the
    processes the others already started."""
    try:
        return ray.get(refs, timeout=timeout + 60)
    except ray.exceptions.RayError as exc:
        for actor in actors:
            ray.kill(actor)
        raise FleetLaunchError(f"{', '.join(names)}: no launch result ({exc})") from None


def _raise_failures(results: list[Started], group: ServerGroup | RouterGroup) -> None:
    errors = [r.error for r in results if r.error]
    if errors:
        group.shutdown().wait()
        raise FleetLaunchError("\n\n".join(errors))


def _on_node(actor_class: Any, node: NodeInfo) -> Any:
    strategy = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)
    # One task at a time, on the actor's main thread: the parent-death signal of the
    # child process is tied to the thread that started it.
    return actor_class.options(scheduling_strategy=strategy)


def _config_log_dir(cfg: Any) -> str | None:
    try:
        return cfg.get("log_dir") if cfg is not None else None
    except AttributeError:
        return None
