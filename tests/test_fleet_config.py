"""Placement strings, rank repacking, the args block and router flags: no Ray needed."""

from __future__ import annotations

import pytest

from rollserve.cluster.cluster import parse_ranks
from rollserve.cluster.placement import packed_strategy, parse_placement
from rollserve.process import command_flags
from rollserve.router import router_flags


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


def test_contiguous_ranks_repack_into_engines_of_tp_times_pp() -> None:
    assert packed_strategy([2, 3, 4, 5], 2).process_ranks == ((2, 3), (4, 5))
    with pytest.raises(ValueError, match="placement_strategy="):
        packed_strategy([0, 1, 3, 4], 2)
    with pytest.raises(ValueError, match="cannot be split"):
        packed_strategy([0, 1, 2], 2)


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


def test_sglang_engines_need_sglang_installed() -> None:
    import importlib.util

    from rollserve.cluster.args import FleetArgs

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    with pytest.raises(ImportError, match="server_type: sglang"):
        FleetArgs(model_path="/m", server_type="sglang")
