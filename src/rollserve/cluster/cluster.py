"""`Cluster`: the Ray nodes the fleet runs on, their ranks, hardware and node groups.

Node ranks are stable for a cluster: the head node is rank 0, the others follow by their
`rollserve/node-rank` label when they carry one (`ray start --labels=...`), then by address
and node id. A node's hardware ranks are its GPUs when it has any; on a CPU-only node they are
groups of `cores_per_rank` CPU cores, so one config shape works on a GPU cluster and a laptop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

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
    cores_per_rank: int

    @property
    def has_gpus(self) -> bool:
        return self.num_gpus > 0

    @property
    def hardware_count(self) -> int:
        return self.num_gpus if self.has_gpus else max(1, self.num_cpus // self.cores_per_rank)


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

    `cluster_cfg` is the config's `cluster:` block: `num_nodes`, `cores_per_rank` (default 1),
    `node_groups` (list of `{label, node_ranks, env_vars}`), `ray_address` (optional). An
    already initialised Ray is used as it is; otherwise `ray_address`, `RAY_ADDRESS` or a
    `ray start` cluster on this machine is joined, or a local Ray started.
    """

    def __init__(self, cluster_cfg: Mapping[str, Any] | None = None, *,
                 ray_address: str | None = None, timeout: float = 120.0) -> None:
        cfg = dict(cluster_cfg or {})
        self.num_nodes = int(cfg.get("num_nodes", 1))
        self.cores_per_rank = int(cfg.get("cores_per_rank", 1))
        if self.cores_per_rank < 1:
            raise ValueError("cluster.cores_per_rank must be >= 1")
        self.started_ray, private = _ensure_ray(ray_address or cfg.get("ray_address"),
                                                self.num_nodes)
        self.nodes = _wait_for_nodes(self.num_nodes, self.cores_per_rank, timeout, private)
        self.node_groups = self._node_groups(cfg.get("node_groups") or [])

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

    def _node_groups(self, specs: Sequence[Mapping[str, Any]]) -> dict[str, NodeGroup]:
        groups = {ALL_NODES: NodeGroup(ALL_NODES, tuple(self.nodes))}
        for spec in specs:
            label = str(spec["label"])
            ranks = parse_ranks(spec.get("node_ranks", "all"), len(self.nodes))
            env = {str(k): str(v) for k, v in (spec.get("env_vars") or {}).items()}
            groups[label] = NodeGroup(label, tuple(self.get_node(r) for r in ranks), env)
        return groups


def parse_ranks(spec: Any, total: int) -> list[int]:
    """`"all"`, `3`, `"0-3"`, `"0-1,4"` or a list of those -> sorted ranks below `total`."""
    if isinstance(spec, int):
        ranks = [spec]
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        ranks = [r for part in spec for r in parse_ranks(part, total)]
    elif str(spec).strip() == "all":
        ranks = list(range(total))
    else:
        ranks = []
        for part in str(spec).split(","):
            first, _, last = part.strip().partition("-")
            try:
                ranks += range(int(first), int(last or first) + 1)
            except ValueError:
                raise ValueError(f"bad rank range {part!r} in {spec!r}: use 'a-b', 'a' or "
                                 "'all'") from None
    bad = [r for r in ranks if not 0 <= r < total]
    if bad:
        raise ValueError(f"rank(s) {bad} in {spec!r} are out of range 0-{total - 1}")
    return sorted(set(ranks))


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


def _wait_for_nodes(count: int, cores_per_rank: int, timeout: float,
                    loopback: bool) -> list[NodeInfo]:
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
                     num_cpus=int(n["Resources"].get("CPU", 0)), cores_per_rank=cores_per_rank)
            for rank, n in enumerate(alive[:count])]


def _node_order(node: Mapping[str, Any]) -> tuple[bool, int, str, str]:
    is_head = "node:__internal_head__" in node["Resources"]
    label = (node.get("Labels") or {}).get(NODE_RANK_LABEL)
    return (not is_head, int(label) if label is not None else 1 << 30,
            node["NodeManagerAddress"], node["NodeID"])
