"""`Cluster`: the Ray nodes the fleet runs on, their ranks, hardware and node groups.

Node ranks are stable for a cluster: the head node is rank 0, the others follow by their
`rollserve/node-rank` label when they carry one (`ray start --labels=...`), then by address
and node id. A node's hardware ranks are its GPUs when it has any; on a CPU-only node they are
groups of `cores_per_rank` CPU cores, so one config shape works on a GPU cluster and a laptop.
Left unset, `cores_per_rank` is chosen so that the ranks `component_placement` names exist.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from rollserve.cluster.placement import RankDemand, parse_ranks, rank_demands

logger = logging.getLogger(__name__)

NODE_RANK_LABEL = "rollserve/node-rank"
# Label of the implicit node group holding every node of the cluster.
ALL_NODES = "__all__"


@dataclass(slots=True, frozen=True)
class NodeInfo:
    """A Ray node; `ip` is the address its engines and router listen on and advertise."""

    rank: int
    node_id: str
    ip: str
    num_gpus: int
    num_cpus: int
    cores_per_rank: int = 1
    cpu_ranks: int = 1  # a CPU-only node's hardware ranks; more than its cores when shared

    @property
    def has_gpus(self) -> bool:
        return self.num_gpus > 0

    @property
    def hardware_count(self) -> int:
        return self.num_gpus if self.has_gpus else self.cpu_ranks

    def split(self, cores_per_rank: int) -> NodeInfo:
        """This node with its cores in ranks of `cores_per_rank` (a remainder stays unused)."""
        return replace(self, cores_per_rank=cores_per_rank,
                       cpu_ranks=max(1, self.num_cpus // cores_per_rank))

    def shared(self, ranks: int) -> NodeInfo:
        """This node with `ranks` one-core ranks spread evenly over its fewer cores."""
        return replace(self, cores_per_rank=1, cpu_ranks=ranks)

    def cpu_cores(self, local_rank: int) -> list[int]:
        """The logical cores a CPU rank's engine is pinned to."""
        cores = max(1, self.num_cpus)
        if self.cpu_ranks > cores:
            return [local_rank * cores // self.cpu_ranks]
        first = local_rank * self.cores_per_rank
        return list(range(first, first + self.cores_per_rank))


@dataclass(slots=True, frozen=True)
class NodeGroup:
    """A labelled set of nodes; its hardware ranks count from 0 across its nodes in order."""

    label: str
    nodes: tuple[NodeInfo, ...]
    env_vars: Mapping[str, str] = field(default_factory=dict)

    @property
    def hardware_count(self) -> int:
        return sum(node.hardware_count for node in self.nodes)

    def locate(self, hardware_rank: int) -> tuple[NodeInfo, int]:
        """Group-wide hardware rank -> (node, local hardware rank on that node)."""
        local = hardware_rank
        for node in self.nodes:
            if 0 <= local < node.hardware_count:
                return node, local
            local -= node.hardware_count
        raise ValueError(f"hardware rank {hardware_rank} is out of range for node group "
                         f"{self.label!r}, which has ranks 0-{self.hardware_count - 1}")


class Cluster:
    """Connects to Ray (or starts a local instance) and waits for `num_nodes` nodes.

    `cluster_cfg` is the config's `cluster:` block: `num_nodes`, `cores_per_rank`,
    `node_groups` (list of `{label, node_ranks, env_vars}`), `ray_address` (optional), and
    `component_placement`, read here only while `cores_per_rank` is unset (None, the
    packaged config's null): then CPU-only nodes are cut into the largest equal groups of cores
    at which every rank the placements name exists, one core per rank when they name no count
    (`all`), and into ranks that share cores evenly, with a warning, when there are more ranks
    than cores (see `fit_cpu_ranks`). An already initialised Ray is used as it is; otherwise
    `ray_address`, `RAY_ADDRESS` or a `ray start` cluster on this machine is joined, or a
    local Ray started.
    """

    def __init__(self, cluster_cfg: Mapping[str, Any] | None = None, *,
                 ray_address: str | None = None, timeout: float = 120.0) -> None:
        cfg = dict(cluster_cfg or {})
        self.num_nodes = int(cfg.get("num_nodes", 1))
        cores_per_rank = _cores_per_rank(cfg.get("cores_per_rank"))
        self.started_ray, private = _ensure_ray(ray_address or cfg.get("ray_address"),
                                                self.num_nodes)
        self.nodes = _wait_for_nodes(self.num_nodes, timeout, private)
        self.node_groups = self._node_groups(cfg.get("node_groups") or [])
        if cores_per_rank is None:
            demands = [(self._member_ranks(d), d)
                       for d in rank_demands(cfg.get("component_placement"))]
            self.cores_per_rank, nodes = fit_cpu_ranks(self.nodes, demands)
        else:
            self.cores_per_rank = cores_per_rank
            nodes = [node.split(cores_per_rank) for node in self.nodes]
        self._set_nodes(nodes)

    def get_node_group(self, label: str | Sequence[str] | None = None) -> NodeGroup:
        """One label, or several: their nodes in the order given, their env vars merged."""
        if label is not None and not isinstance(label, str):
            groups = [self.get_node_group(part) for part in label]
            return NodeGroup(",".join(g.label for g in groups),
                             tuple(node for g in groups for node in g.nodes),
                             {k: v for g in groups for k, v in g.env_vars.items()})
        key = ALL_NODES if label is None else label
        if key not in self.node_groups:
            raise ValueError(f"unknown node group {label!r}; cluster.node_groups defines "
                             f"{sorted(k for k in self.node_groups if k != ALL_NODES)}")
        return self.node_groups[key]

    def get_node(self, rank: int) -> NodeInfo:
        if not 0 <= rank < len(self.nodes):
            raise ValueError(f"node rank {rank} is out of range: the cluster has "
                             f"{len(self.nodes)} node(s)")
        return self.nodes[rank]

    def shutdown(self) -> None:
        """Stops Ray if this object started it."""
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    def _member_ranks(self, demand: RankDemand) -> tuple[int, ...]:
        return tuple(node.rank for node in self.get_node_group(demand.node_group).nodes)

    def _set_nodes(self, nodes: list[NodeInfo]) -> None:
        """The nodes with their CPU ranks decided, in every node group too."""
        self.nodes = nodes
        self.node_groups = {label: replace(group, nodes=tuple(nodes[n.rank] for n in group.nodes))
                            for label, group in self.node_groups.items()}

    def _node_groups(self, specs: Sequence[Mapping[str, Any]]) -> dict[str, NodeGroup]:
        groups = {ALL_NODES: NodeGroup(ALL_NODES, tuple(self.nodes))}
        for spec in specs:
            label = str(spec["label"])
            ranks = parse_ranks(spec.get("node_ranks", "all"), len(self.nodes))
            env = {str(k): str(v) for k, v in (spec.get("env_vars") or {}).items()}
            groups[label] = NodeGroup(label, tuple(self.get_node(r) for r in ranks), env)
        return groups


def fit_cpu_ranks(nodes: Sequence[NodeInfo], demands: Sequence[tuple[tuple[int, ...], RankDemand]]
                  ) -> tuple[int, list[NodeInfo]]:
    """`cores_per_rank` unset -> (cores per rank, the nodes split so every demand fits).

    `demands` pairs each placement with the node ranks of its node group. Ranks get the most
    cores at which every rank named exists, one core when no count is named. With more ranks
    than cores the ranks share cores evenly rather than fail: the user asked for that many
    engines and did not fix the rank size, Ray itself does not refuse them (the actors take
    no CPU resource), and the same config then runs on a laptop and a server. Each engine
    runs one OpenMP thread there, so they time-slice without spinning against each other,
    and the warning says what that costs.
    """
    named = [(members, demand) for members, demand in demands if demand.ranks > 0]
    largest = max((node.num_cpus for node in nodes if not node.has_gpus), default=1)
    for size in range(max(1, largest) if named else 1, 0, -1):
        split = [node.split(size) for node in nodes]
        if all(_rank_count(split, members) >= d.ranks for members, d in named):
            return size, split
    split = [node.split(1) for node in nodes]
    counts = [node.cpu_ranks for node in split]
    for members, demand in named:
        cpu = [r for r in members if not split[r].has_gpus]
        capacity = _rank_count(split, members)
        if capacity >= demand.ranks or not cpu:
            continue  # a GPU-only group: ComponentPlacement names the shortfall
        wanted = demand.ranks - sum(split[r].num_gpus for r in members)
        cores = sum(max(1, split[r].num_cpus) for r in cpu)
        for r in cpu:  # in proportion to each node's cores, rounded up
            counts[r] = max(counts[r], -(-wanted * max(1, split[r].num_cpus) // cores))
        logger.warning(
            "cluster.component_placement.%s=%r names %d hardware ranks, but the CPU-only "
            "nodes it may use have %d cores: engines will share cores (up to %d on one, each "
            "with one thread) and run correspondingly slower. Place at most %d to give each "
            "its own hardware.", demand.key, demand.spec, demand.ranks, cores,
            max(-(-counts[r] // max(1, split[r].num_cpus)) for r in cpu), capacity)
    return 1, [node.shared(count) if count > node.cpu_ranks else node
               for node, count in zip(split, counts, strict=True)]


def _rank_count(nodes: Sequence[NodeInfo], members: tuple[int, ...]) -> int:
    return sum(nodes[rank].hardware_count for rank in members)


def _cores_per_rank(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"cluster.cores_per_rank must be a whole number >= 1, or null to "
                         f"split the cores to fit component_placement; got {value!r}")
    return value


def _ensure_ray(address: str | None, num_nodes: int) -> tuple[bool, bool]:
    """Initialises Ray if needed -> (this call started Ray, it is a private local instance).

    One node and no address (argument or RAY_ADDRESS): a private local Ray, whose engines
    and router then listen on 127.0.0.1 only. Otherwise Ray's own rule: the address, else a
    cluster started with `ray start` on this machine.
    """
    if ray.is_initialized():
        return False, False
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    private = address is None and not os.environ.get("RAY_ADDRESS") and num_nodes == 1
    ray.init(address="local" if private else address, **options)
    return True, private


def _wait_for_nodes(count: int, timeout: float, loopback: bool) -> list[NodeInfo]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster.num_nodes={count} but only {len(alive)} Ray node(s) "
                               f"joined within {timeout}s")
        time.sleep(0.5)
    alive.sort(key=_node_order)
    return [NodeInfo(rank=rank, node_id=n["NodeID"],
                     ip="127.0.0.1" if loopback else n["NodeManagerAddress"],
                     num_gpus=int(n["Resources"].get("GPU", 0)),
                     num_cpus=int(n["Resources"].get("CPU", 0)))
            for rank, n in enumerate(alive[:count])]


def _node_order(node: Mapping[str, Any]) -> tuple[bool, int, str, str]:
    is_head = "node:__internal_head__" in node["Resources"]
    label = (node.get("Labels") or {}).get(NODE_RANK_LABEL)
    return (not is_head, int(label) if label is not None else 1 << 30,
            node["NodeManagerAddress"], node["NodeID"])
