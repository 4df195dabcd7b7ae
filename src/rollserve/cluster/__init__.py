"""One config -> engine servers + one sglang-router on a Ray cluster (seed 004)."""

from rollserve.cluster.cluster import Cluster, NodeGroup, NodeInfo
from rollserve.cluster.config import load_config
from rollserve.cluster.fleet import (
    FleetLaunchError,
    launch_router_and_servers,
    launch_sglang_router_and_server,
)
from rollserve.cluster.handles import EngineInfo, Pending, RouterGroup, ServerGroup
from rollserve.cluster.placement import ComponentPlacement, PlacementStrategy, packed_strategy

__all__ = [
    "Cluster",
    "ComponentPlacement",
    "EngineInfo",
    "FleetLaunchError",
    "NodeGroup",
    "NodeInfo",
    "Pending",
    "PlacementStrategy",
    "RouterGroup",
    "ServerGroup",
    "launch_router_and_servers",
    "launch_sglang_router_and_server",
    "load_config",
    "packed_strategy",
]
