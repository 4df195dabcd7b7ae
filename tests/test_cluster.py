"""The fleet launcher on a real local Ray: two engines + the real sglang-router (seed 004)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import requests
from conftest import tp_ranks
from omegaconf import OmegaConf

from rollserve.client import InferenceHTTPClient
from rollserve.cluster import (
    Cluster,
    ComponentPlacement,
    FleetLaunchError,
    launch_router_and_servers,
    launch_sglang_router_and_server,
)

NO_PROXY = {"http": None, "https": None}


def fleet_config(model_path, log_dir, **overrides) -> OmegaConf:
    """Seed 004's config, with CPU-sized server settings."""
    cfg = OmegaConf.create({
        "cluster": {"num_nodes": 1, "component_placement": {"rollout": "all"}},
        "router_server_args": {
            "model_path": str(model_path), "tensor_parallel_size": 1,
            "pipeline_parallel_size": 1, "group_name": "SGLangServerGroup",
            "launch_server": True, "log_dir": str(log_dir), "startup_timeout_secs": 120,
            "server": {"model_path": "${..model_path}", "tp_size": "${..tensor_parallel_size}",
                       "max_running_requests": 64, "log_level": "warning",
                       "dtype": "float32", "max_total_tokens": 4096},
            "router_group_name": "SGLangRouterGroup", "launch_router": True,
            "router": {"policy": "round_robin", "log_level": "warn",
                       "worker_startup_timeout_secs": 1800, "request_timeout_secs": 1800,
                       "health_check_interval_secs": 1, "health_failure_threshold": 1},
        },
    })
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield Cluster(cluster_cfg={"num_nodes": 1})
    finally:
        ray.shutdown()


def launch(cfg, cluster):
    """Seed 004's driver lines, with only the launcher's name changed."""
    placement = ComponentPlacement(cfg, cluster)
    component_name = "rollout"
    return launch_router_and_servers(
        cfg, cluster, rollout_hardware_ranks=placement.get_hardware_ranks(component_name),
        router_server_args=cfg.router_server_args,
    )


@pytest.fixture(scope="module")
def fleet(local_ray, llama_path, tmp_path_factory):
    cfg = fleet_config(llama_path, tmp_path_factory.mktemp("fleet-logs"))
    server_group, router_group = launch(cfg, local_ray)
    try:
        yield server_group, router_group
    finally:
        router_group.shutdown().wait()
        server_group.shutdown().wait()


def test_two_engines_behind_the_router_serve_requests(fleet) -> None:
    server_group, router_group = fleet
    router_url = router_group.get_router_url().wait()[0]
    urls = server_group.get_server_url().wait()
    assert len(urls) == 2 and len(set(urls)) == 2
    assert all(url.startswith("http://127.0.0.1:") for url in [router_url, *urls])
    assert server_group.is_healthy().wait() == [True, True]
    assert router_group.is_healthy().wait() == [True]
    listed = {w["url"] for w in router_group.list_workers().wait()[0]}
    assert listed == set(urls)
    client = InferenceHTTPClient(router_url)
    outs = client.generate_many(prompts=[f"prompt {i}" for i in range(8)],
                                sampling_params={"max_new_tokens": 3})
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [3] * 8
    served = [_finished(url) for url in urls]
    assert all(count > 0 for count in served), served  # round_robin used both engines


def test_register_and_unregister_a_server(fleet) -> None:
    server_group, router_group = fleet
    urls = server_group.get_server_url().wait()
    router_group.unregister_server(urls[1]).wait()
    assert [w["url"] for w in router_group.list_workers().wait()[0]] == [urls[0]]
    before = _finished(urls[1])
    client = InferenceHTTPClient(router_group.get_router_url().wait()[0])
    client.generate_many(prompts=["a", "b", "c", "d"], sampling_params={"max_new_tokens": 1})
    assert _finished(urls[1]) == before  # the router no longer sends it anything
    router_group.register_server(urls[1]).wait()
    assert {w["url"] for w in router_group.list_workers().wait()[0]} == set(urls)


def test_seed_alias_and_engine_placement(fleet) -> None:
    server_group, _ = fleet
    assert launch_sglang_router_and_server is launch_router_and_servers
    assert [e.hardware_ranks for e in server_group.engines] == [(0,), (1,)]
    assert [e.device for e in server_group.engines] == ["cpu cores 0", "cpu cores 1"]


def test_more_engines_than_cores_share_the_cores_unless_cores_per_rank_is_set(
        local_ray, llama_path, tmp_path) -> None:
    from rollserve.cluster.args import FleetArgs
    from rollserve.cluster.fleet import plan_engines
    from rollserve.cluster.placement import packed_strategy

    cfg = fleet_config(llama_path, tmp_path, cluster={"component_placement": {"rollout": "0-3"}})
    cluster = Cluster(cluster_cfg=cfg.cluster)  # on this module's Ray of 2 CPUs
    ranks = ComponentPlacement(cfg, cluster).get_hardware_ranks("rollout")
    assert ranks == [0, 1, 2, 3]
    slots = plan_engines(cluster, packed_strategy(ranks, 1),
                         FleetArgs.from_config(cfg.router_server_args))
    assert [slot.device_env()[1:] for slot in slots] == [
        ([0], "cpu cores 0"), ([0], "cpu cores 0"), ([1], "cpu cores 1"), ([1], "cpu cores 1")]
    pinned = Cluster(cluster_cfg={**cfg.cluster, "cores_per_rank": 1})
    with pytest.raises(ValueError, match=r"rollout='0-3' names hardware ranks 0-3, but the "
                                         r"cluster has 2: cluster\.cores_per_rank=1 makes"):
        ComponentPlacement(cfg, pinned)


def test_killed_engine_is_visible_and_the_fleet_keeps_serving_then_shutdown_is_clean(
        local_ray, llama_path, tmp_path) -> None:
    server_group, router_group = launch(fleet_config(llama_path, tmp_path), local_ray)
    try:
        pids = server_group.get_pid().wait() + router_group.get_pid().wait()
        urls = server_group.get_server_url().wait()
        os.kill(pids[0], signal.SIGKILL)
        assert _eventually(lambda: server_group.is_healthy().wait() == [False, True])
        client = InferenceHTTPClient(router_group.get_router_url().wait()[0])
        outs = client.generate_many(prompts=[f"q{i}" for i in range(12)],
                                    sampling_params={"max_new_tokens": 2})
        assert all(o["meta_info"]["completion_tokens"] == 2 for o in outs)
        assert _eventually(lambda: _router_health(router_group) == {urls[0]: False,
                                                                     urls[1]: True})
    finally:
        router_group.shutdown().wait()
        server_group.shutdown().wait()
    assert router_group.shutdown().wait() == []  # idempotent
    assert not [pid for pid in pids if _alive(pid)]
    for url in [*urls, router_group.get_router_url().wait()[0]]:
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", proxies=NO_PROXY, timeout=5)


def test_a_tp2_config_launches_engines_of_two_ranks_and_a_lost_rank_shows_in_health(
        local_ray, llama_path, tmp_path) -> None:
    """Seed 004's config with tensor_parallel_size: 2: on 2 cores, one engine of two ranks
    (one core each)."""
    cfg = fleet_config(llama_path, tmp_path, router_server_args={"tensor_parallel_size": 2})
    server_group, router_group = launch(cfg, local_ray)
    try:
        [url] = server_group.get_server_url().wait()
        info = requests.get(url + "/server_info", proxies=NO_PROXY, timeout=10).json()
        assert info["tp_size"] == 2
        client = InferenceHTTPClient(router_group.get_router_url().wait()[0])
        outs = client.generate_many(prompts=[f"q{i}" for i in range(6)],
                                    sampling_params={"max_new_tokens": 3})
        assert all(o["meta_info"]["completion_tokens"] == 3 for o in outs)
        [rank] = tp_ranks(server_group.get_pid().wait()[0])
        rank.kill()
        assert _eventually(lambda: server_group.is_healthy().wait() == [False], timeout=60)
    finally:
        router_group.shutdown().wait()
        server_group.shutdown().wait()


def test_unknown_server_key_is_refused_before_anything_starts(local_ray, llama_path,
                                                               tmp_path) -> None:
    cfg = fleet_config(llama_path, tmp_path,
                       router_server_args={"server": {"max_runing_requests": 8}})
    with pytest.raises(TypeError, match="max_runing_requests"):
        launch(cfg, local_ray)


def test_unknown_router_key_lists_the_valid_fields(local_ray, llama_path, tmp_path) -> None:
    cfg = fleet_config(llama_path, tmp_path, router_server_args={"router": {"polcy": "x"}})
    with pytest.raises(ValueError, match="polcy") as error:
        launch(cfg, local_ray)
    assert "cache_threshold" in str(error.value) and "health_check_interval_secs" in str(
        error.value)


def test_non_contiguous_ranks_point_to_placement_strategy(local_ray, llama_path,
                                                          tmp_path) -> None:
    cfg = fleet_config(llama_path, tmp_path)
    with pytest.raises(ValueError, match="placement_strategy="):
        launch_router_and_servers(cfg, local_ray, rollout_hardware_ranks=[0, 2],
                                  router_server_args=cfg.router_server_args)


def test_missing_model_path_names_it_and_leaves_nothing_running(local_ray, tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    cfg = fleet_config(missing, tmp_path)
    before = _engine_processes()
    with pytest.raises(FleetLaunchError, match="SGLangServerGroup-0") as error:
        launch(cfg, local_ray)
    assert str(missing) in str(error.value)
    assert _eventually(lambda: _engine_processes() == before)


def test_explicit_placement_strategy_is_used_as_given(local_ray, llama_path, tmp_path) -> None:
    cfg = fleet_config(llama_path, tmp_path, cluster={"component_placement": {
        "rollout": "0-1:0-1"}}, router_server_args={"launch_router": False})
    placement = ComponentPlacement(cfg, local_ray)
    server_group, router_group = launch_router_and_servers(
        cfg, local_ray, rollout_hardware_ranks=None,
        router_server_args=cfg.router_server_args,
        placement_strategy=placement.get_strategy("rollout"))
    try:
        assert router_group is None
        assert [e.hardware_ranks for e in server_group.engines] == [(0,), (1,)]
        assert server_group.is_healthy().wait() == [True, True]
    finally:
        server_group.shutdown().wait()


def _finished(url: str) -> int:
    info = requests.get(url + "/server_info", proxies=NO_PROXY, timeout=10).json()
    return info["internal_states"][0]["requests_finished"]


def _router_health(router_group) -> dict[str, bool]:
    return {w["url"]: w["is_healthy"] for w in router_group.list_workers().wait()[0]}


def _eventually(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return check()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _engine_processes() -> set[int]:
    """Engine server processes started for the missing model."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "rollserve.launch_server" in cmdline and "no-such-model" in " ".join(cmdline):
            found.add(proc.info["pid"])
    return found


def test_a_launch_that_raises_stops_the_other_actors_of_that_launch(local_ray) -> None:
    """A launch that raises (rather than reporting an error) must not leave the engines that
    did start running until the driver exits."""
    import ray

    from rollserve.cluster.fleet import _gather

    @ray.remote(num_cpus=0)
    class Launcher:
        def launch(self, fail: bool) -> str:
            if fail:
                raise OSError("cannot create the log directory")
            return "started"

        def ping(self) -> bool:
            return True

    actors = [Launcher.remote() for _ in range(2)]
    refs = [actor.launch.remote(index == 1) for index, actor in enumerate(actors)]
    with pytest.raises(FleetLaunchError, match="cannot create the log directory"):
        _gather(refs, 30, ["engine-0", "engine-1"], actors)
    # ray.kill is asynchronous: a ping may still be answered before the kill lands.
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(actors[0].ping.remote(), timeout=30)
            time.sleep(0.1)
