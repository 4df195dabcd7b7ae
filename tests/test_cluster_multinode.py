"""A simulated two-node Ray cluster (`ray.cluster_utils.Cluster`) with node groups."""

from __future__ import annotations

import psutil
import pytest
from test_cluster import fleet_config

from rollserve.client import InferenceHTTPClient
from rollserve.cluster import Cluster, ComponentPlacement, launch_router_and_servers


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster as RayTestCluster

    simulated = RayTestCluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False})
    try:
        simulated.add_node(num_cpus=2)
        simulated.wait_for_nodes()
        ray.init(address=simulated.address, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        simulated.shutdown()


def test_engines_land_on_their_node_group_and_the_router_on_node_0(two_nodes, llama_path,
                                                                   tmp_path) -> None:
    cfg = fleet_config(llama_path, tmp_path, cluster={
        "num_nodes": 2,
        "component_placement": {"rollout": {"node_group": "rollout_nodes",
                                            "placement": "all"}},
        "node_groups": [{"label": "rollout_nodes", "node_ranks": 1,
                         "env_vars": {"ROLLSERVE_TEST_GROUP": "rollout_nodes"}},
                        {"label": "test", "node_ranks": 0}],
    })
    cluster = Cluster(cluster_cfg=cfg.cluster)
    assert "node:__internal_head__" in _resources(cluster.get_node(0).node_id)
    placement = ComponentPlacement(cfg, cluster)
    component_name = "rollout"
    llm_cfg = cfg.cluster.component_placement.get(component_name)
    rollout_node_group = llm_cfg.get("node_group", None)
    assert placement.get_hardware_ranks(component_name) == [0, 1]  # node 1's two cores
    server_group, router_group = launch_router_and_servers(
        cfg, cluster, rollout_hardware_ranks=placement.get_hardware_ranks(component_name),
        router_server_args=cfg.router_server_args, rollout_node_group=rollout_node_group)
    try:
        node_ids = server_group.get_node_id().wait()
        assert node_ids == [cluster.get_node(1).node_id] * 2
        assert router_group.get_node_id().wait() == [cluster.get_node(0).node_id]
        assert [e.node_rank for e in server_group.engines] == [1, 1]
        for pid in server_group.get_pid().wait():  # the node group's env_vars
            assert psutil.Process(pid).environ()["ROLLSERVE_TEST_GROUP"] == "rollout_nodes"
        client = InferenceHTTPClient(router_group.get_router_url().wait()[0])
        out = client.generate(prompt="hello", sampling_params={"max_new_tokens": 2})
        assert out["meta_info"]["completion_tokens"] == 2
    finally:
        router_group.shutdown().wait()
        server_group.shutdown().wait()


def _resources(node_id: str) -> dict:
    import ray

    return next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
