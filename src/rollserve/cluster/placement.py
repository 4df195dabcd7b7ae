"""`cluster.component_placement`: which hardware ranks each component's processes use.

A placement value is a string of comma-separated segments `resources[:processes]`, where
both parts are rank ranges (`a-b`, `a`) or `all`:
- `0-3`: four processes, one per hardware rank 0..3;
- `0-1:0-3`: processes 0..3 share ranks 0..1 evenly (two per rank);
- `0-3:0-1`: processes 0..1 each take two ranks (0-1 and 2-3);
- `0-1:0-3,3-5`: the first rule, then processes 4..6 on ranks 3, 4, 5.
Process ranks run from 0 without gaps across segments. The value may also be a mapping
`{node_group: LABEL, placement: STRING}`; ranks then count within that node group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # cluster.py reads placements to size CPU ranks, so it imports this module
    from rollserve.cluster.cluster import Cluster, NodeGroup


@dataclass(slots=True, frozen=True)
class PlacementStrategy:
    """Each process's hardware ranks (within `node_group`, or the whole cluster if None)."""

    process_ranks: tuple[tuple[int, ...], ...]
    node_group: str | tuple[str, ...] | None = None

    @property
    def hardware_ranks(self) -> list[int]:
        return sorted({rank for ranks in self.process_ranks for rank in ranks})


def packed_strategy(hardware_ranks: Sequence[int], ranks_per_process: int,
                    node_group: str | Sequence[str] | None = None) -> PlacementStrategy:
    """Contiguous ranks `[a, a+1, ...]` -> processes of `ranks_per_process` consecutive ranks."""
    ranks = list(hardware_ranks)
    if not ranks:
        raise ValueError("no hardware ranks to place engines on")
    if ranks != list(range(ranks[0], ranks[0] + len(ranks))):
        raise ValueError(
            f"hardware ranks {ranks} are not contiguous, so they cannot be repacked into "
            "engines; build the layout yourself and pass it as placement_strategy= "
            "(e.g. ComponentPlacement(cfg, cluster).get_strategy(name))")
    if len(ranks) % ranks_per_process:
        raise ValueError(f"{len(ranks)} hardware ranks cannot be split into engines of "
                         f"tensor_parallel_size x pipeline_parallel_size = {ranks_per_process}")
    groups = tuple(tuple(ranks[i:i + ranks_per_process])
                   for i in range(0, len(ranks), ranks_per_process))
    return PlacementStrategy(groups, _label(node_group))


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


def parse_placement(spec: str, total: int) -> tuple[tuple[int, ...], ...]:
    """Placement string -> each process's hardware ranks (see the module docstring)."""
    processes: list[tuple[int, ...]] = []
    for segment in str(spec).split(","):
        resource_part, _, process_part = segment.strip().partition(":")
        resources = parse_ranks(resource_part, total)
        if not process_part:
            processes += [(rank,) for rank in resources]
            continue
        wanted = parse_ranks(process_part, 1 << 30)
        if wanted != list(range(len(processes), len(processes) + len(wanted))):
            raise ValueError(f"placement {spec!r}: process ranks must continue from "
                             f"{len(processes)} without gaps, got {process_part!r}")
        processes += _spread(resources, len(wanted), spec)
    return tuple(processes)


def _spread(resources: list[int], count: int, spec: str) -> list[tuple[int, ...]]:
    if count >= len(resources):  # several processes share one resource
        return [(resources[i * len(resources) // count],) for i in range(count)]
    if len(resources) % count:
        raise ValueError(f"placement {spec!r}: {len(resources)} ranks cannot be split evenly "
                         f"over {count} processes")
    size = len(resources) // count
    return [tuple(resources[i * size:(i + 1) * size]) for i in range(count)]


@dataclass(slots=True, frozen=True)
class RankDemand:
    """One `component_placement` entry: its key, node group, placement string, and how
    many hardware ranks that string names (its highest rank + 1; 0 when it says `all`)."""

    key: str
    node_group: str | tuple[str, ...] | None
    spec: str
    ranks: int


def rank_demands(placements: Mapping[str, Any] | None) -> list[RankDemand]:
    demands = []
    for key, value in (placements or {}).items():
        if isinstance(value, Mapping):
            group, spec = _label(value.get("node_group")), str(value.get("placement", "all"))
        else:
            group, spec = None, str(value)
        demands.append(RankDemand(str(key), group, spec, ranks_named(spec)))
    return demands


def ranks_named(spec: str) -> int:
    """The highest hardware rank a placement string names, + 1; `all` fits any count."""
    highest = -1
    for segment in str(spec).split(","):
        resources = segment.partition(":")[0].strip()
        if resources != "all":
            highest = max(highest, *parse_ranks(resources, 1 << 30))
    return highest + 1


class ComponentPlacement:
    """Reads `cfg.cluster.component_placement`; a key may name several components (`a,b`)."""

    def __init__(self, cfg: Any, cluster: Cluster) -> None:
        self._strategies: dict[str, PlacementStrategy] = {}
        for demand in rank_demands(cfg["cluster"]["component_placement"]):
            group = cluster.get_node_group(demand.node_group)
            if demand.ranks > group.hardware_count:
                raise ValueError(_shortfall(demand, group))
            strategy = PlacementStrategy(parse_placement(demand.spec, group.hardware_count),
                                         demand.node_group)
            for name in demand.key.split(","):
                if name.strip() in self._strategies:
                    raise ValueError(f"component {name.strip()!r} is placed twice")
                self._strategies[name.strip()] = strategy

    @property
    def components(self) -> list[str]:
        return list(self._strategies)

    def get_strategy(self, component: str) -> PlacementStrategy:
        if component not in self._strategies:
            raise KeyError(f"no component {component!r} in cluster.component_placement; it "
                           f"has {self.components}")
        return self._strategies[component]

    def get_hardware_ranks(self, component: str) -> list[int]:
        return self.get_strategy(component).hardware_ranks

    def get_node_group(self, component: str) -> str | tuple[str, ...] | None:
        return self.get_strategy(component).node_group


def _shortfall(demand: RankDemand, group: NodeGroup) -> str:
    where = "the cluster" if demand.node_group is None else f"node group {group.label!r}"
    message = (f"cluster.component_placement.{demand.key}={demand.spec!r} names hardware "
               f"ranks 0-{demand.ranks - 1}, but {where} has {group.hardware_count}")
    cpu_nodes = [node for node in group.nodes if not node.has_gpus]
    if not cpu_nodes:
        return message + " (its GPUs)"
    # Only an explicit cores_per_rank gets here: left unset, the cores are split to fit.
    return (message + f": cluster.cores_per_rank={cpu_nodes[0].cores_per_rank} makes "
            f"{', '.join(f'{n.num_cpus} cores' for n in cpu_nodes)} into "
            f"{', '.join(str(n.hardware_count) for n in cpu_nodes)} rank(s); lower it, or "
            "leave it unset (null) to split the cores to fit the placement")


def _label(node_group: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    """A node-group label, a comma-separated list of them, or a list -> hashable form."""
    if node_group is None or (isinstance(node_group, str) and "," not in node_group):
        return node_group
    parts = node_group.split(",") if isinstance(node_group, str) else node_group
    return tuple(str(part).strip() for part in parts)
