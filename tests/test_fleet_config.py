"""Placement strings, rank repacking, the args block and router flags: no Ray needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollserve.cluster.cluster import NodeInfo, fit_cpu_ranks, parse_ranks
from rollserve.cluster.placement import packed_strategy, parse_placement, rank_demands
from rollserve.cluster.router import router_flags
from rollserve.utils.process import command_flags


def test_placement_strings_map_processes_to_hardware_ranks() -> None:
    assert parse_placement("all", 4) == ((0,), (1,), (2,), (3,))
    assert parse_placement("0-3", 8) == ((0,), (1,), (2,), (3,))
    assert parse_placement("0-1:0-3", 2) == ((0,), (0,), (1,), (1,))
    assert parse_placement("0-3:0-1", 4) == ((0, 1), (2, 3))
    assert parse_placement("0-1:0-3,3-5", 8) == ((0,), (0,), (1,), (1,), (3,), (4,), (5,))


def test_placement_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_placement("0-4", 4)
    with pytest.raises(ValueError, match="without gaps"):
        parse_placement("0-1:2-3", 4)
    with pytest.raises(ValueError, match="evenly"):
        parse_placement("0-2:0-1", 4)
    with pytest.raises(ValueError, match="bad rank range"):
        parse_ranks("zero-1", 4)


def cpu_node(rank: int, cores: int) -> NodeInfo:
    return NodeInfo(rank=rank, node_id=f"n{rank}", ip="127.0.0.1", num_gpus=0, num_cpus=cores)


def fit(nodes: list[NodeInfo], **placements: str) -> tuple[int, list[list[list[int]]]]:
    """cores_per_rank unset -> (cores per rank, each node's ranks as their core lists)."""
    demands = [(tuple(n.rank for n in nodes), d) for d in rank_demands(placements)]
    size, split = fit_cpu_ranks(nodes, demands)
    return size, [[n.cpu_cores(r) for r in range(n.hardware_count)] for n in split]


def test_unset_cores_per_rank_gives_the_placed_ranks_the_most_cores_that_fit() -> None:
    assert fit([cpu_node(0, 16)], rollout="0-3") == (
        4, [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]])
    assert fit([cpu_node(0, 16)], rollout="0-1", trainer="2-4")[0] == 3
    assert fit([cpu_node(0, 4), cpu_node(1, 4)], rollout="0-3")[1] == [
        [[0, 1], [2, 3]], [[0, 1], [2, 3]]]
    assert fit([cpu_node(0, 4)], rollout="all") == (1, [[[0], [1], [2], [3]]])


def test_more_ranks_than_cores_share_cores_evenly_with_a_warning(caplog) -> None:
    assert fit([cpu_node(0, 2)], rollout="0-3") == (1, [[[0], [0], [1], [1]]])
    assert "names 4 hardware ranks" in caplog.text and "Place at most 2" in caplog.text
    assert fit([cpu_node(0, 3)], rollout="0-3")[1] == [[[0], [0], [1], [2]]]
    assert fit([cpu_node(0, 2), cpu_node(1, 2)], rollout="0-5")[1] == [
        [[0], [0], [1]], [[0], [0], [1]]]


def test_contiguous_ranks_repack_into_engines_of_tp_times_pp() -> None:
    assert packed_strategy([2, 3, 4, 5], 2).process_ranks == ((2, 3), (4, 5))
    with pytest.raises(ValueError, match="placement_strategy="):
        packed_strategy([0, 1, 3, 4], 2)
    with pytest.raises(ValueError, match="cannot be split"):
        packed_strategy([0, 1, 2], 2)


def test_the_packaged_config_loads_outside_hydra_with_command_line_overrides() -> None:
    from omegaconf import OmegaConf

    from rollserve.cluster import load_config

    cfg = load_config(["model_path=/m", "cluster.component_placement.rollout=0-3",
                       "+router_server_args.server.max_total_tokens=4096"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["router_server_args"]["server"]["model_path"] == "/m"
    assert resolved["router_server_args"]["server"]["max_total_tokens"] == 4096
    assert resolved["cluster"]["component_placement"] == {"rollout": "0-3"}
    assert resolved["cluster"]["cores_per_rank"] is None  # split to fit the placement
    log_dir = Path(resolved["log_dir"])
    assert log_dir.name == "logs" and log_dir.parent.is_dir()
    assert resolved["router_server_args"]["log_dir"] == str(log_dir)
    assert load_config()["log_dir"] == str(log_dir)  # one directory per process


def test_config_values_become_flags() -> None:
    assert command_flags({"--a": 1, "--b": True, "--c": False, "--d": None,
                          "--e": ["x", "y"]}) == ["--a", "1", "--b", "--e", "x", "y"]


def test_router_block_becomes_validated_launch_router_flags() -> None:
    flags = router_flags({"policy": "cache_aware", "dp_aware": True, "disable_retries": False,
                          "request_id_headers": ["x-a", "x-b"], "api_key": None,
                          "selector": {"app": "sglang"}})
    assert flags == ["--policy", "cache_aware", "--dp-aware", "--request-id-headers", "x-a",
                     "x-b", "--selector", "app=sglang"]
    with pytest.raises(ValueError, match="invalid router arguments"):
        router_flags({"policy": "fastest"})
    with pytest.raises(ValueError, match=r"unknown router argument.*valid RouterArgs fields"):
        router_flags({"polcy": "random"})


def test_args_block_fills_runtime_keys_and_refuses_to_have_them_preset() -> None:
    from rollserve.cluster.args import FleetArgs

    args = FleetArgs.from_config({"model_path": "/m", "server": {"dtype": "float32"},
                                  "unrelated_runner_key": 1})
    command = args.server_command("10.0.0.5", 4000, None)
    assert command[1:3] == ["-m", "rollserve.launch_server"]
    assert command[3:] == ["--dtype", "float32", "--model-path", "/m", "--tp-size", "1",
                           "--host", "10.0.0.5", "--port", "4000"]
    with pytest.raises(ValueError, match=r"server\.port is filled in by the launcher"):
        FleetArgs(model_path="/m", server={"port": 1})


def test_pipeline_parallelism_is_refused_by_name() -> None:
    from rollserve.cluster.args import FleetArgs

    with pytest.raises(ValueError, match="pipeline_parallel_size=2: rollserve engines do not"):
        FleetArgs(model_path="/m", pipeline_parallel_size=2)


def test_sglang_engines_need_sglang_installed() -> None:
    import importlib.util

    from rollserve.cluster.args import FleetArgs

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    with pytest.raises(ImportError, match="server_type: sglang"):
        FleetArgs(model_path="/m", server_type="sglang")
