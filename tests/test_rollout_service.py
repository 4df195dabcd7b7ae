"""`RolloutService` (seed 002's API) on a managed fleet: two engines behind the router."""

from __future__ import annotations

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from rollserve.rl import RolloutService

NO_PROXY = {"http": None, "https": None}
SEQUENCE = [11, 42, 7, 300, 5, 99, 123, 64]


@pytest.fixture(scope="module")
def service(llama_path):
    with RolloutService.from_pretrained(str(llama_path), dp_size=2, dtype="float32",
                                        max_total_tokens=4096) as managed:
        yield managed


@pytest.fixture(scope="module")
def synced_service(service):
    """The service with its weight update group initialised (once per module)."""
    service.init_weight_update_group()
    return service


@pytest.fixture(scope="module")
def trainer_model(llama_path):
    return AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)


def test_connect_to_nothing_raises_connection_error() -> None:
    from conftest import free_port

    with pytest.raises(ConnectionError, match="no healthy"):
        RolloutService.connect(f"http://127.0.0.1:{free_port()}")


def test_generate_shapes_follow_the_input(service) -> None:
    one = service.generate("The capital of France is", {"max_tokens": 4, "temperature": 0})
    assert isinstance(one, dict) and one["meta_info"]["completion_tokens"] == 4
    assert set(one) >= {"text", "output_ids", "meta_info"}
    batch = service.generate(["a", "b", "c"], max_new_tokens=3)
    assert [o["meta_info"]["completion_tokens"] for o in batch] == [3, 3, 3]
    ids_one = service.generate(input_ids=[5, 6, 7], max_tokens=2)
    assert isinstance(ids_one, dict) and len(ids_one["output_ids"]) == 2
    ids_batch = service.generate(input_ids=[[5, 6], [7, 8, 9]], max_tokens=2, return_text=False)
    assert len(ids_batch) == 2 and all("text" not in o for o in ids_batch)
    assert service.generate_batch(["x"], max_tokens=1)[0]["meta_info"]["completion_tokens"] == 1


def test_generate_refuses_ambiguous_input(service) -> None:
    with pytest.raises(ValueError, match="exactly one of prompts and input_ids"):
        service.generate("a", input_ids=[1])
    with pytest.raises(ValueError, match="exactly one of prompts and input_ids"):
        service.generate()


def test_kwargs_reach_the_server_as_sampling_params(service) -> None:
    greedy = service.generate("hello", temperature=0.0, max_tokens=6)
    again = service.generate("hello", {"temperature": 1.0}, temperature=0.0, max_tokens=6)
    assert greedy["output_ids"] == again["output_ids"]  # kwargs override the dict
    from rollserve.client import InferenceHTTPError

    # The router re-serialises sampling params and drops keys it does not know, so the
    # engine's refusal is checked on an engine directly.
    direct = RolloutService.connect(service.engine_urls()[0])
    with pytest.raises(InferenceHTTPError, match="no_such_param"):
        direct.generate("hello", no_such_param=1)


def test_logprobs_are_logprob_token_text_triples(service, trainer_model) -> None:
    out = service.generate(input_ids=SEQUENCE, return_logprobs=True, max_tokens=4,
                           temperature=0)
    triples = out["meta_info"]["output_token_logprobs"]
    assert [token for _, token, _ in triples] == out["output_ids"]
    assert all(isinstance(lp, float) and lp <= 0 for lp, _, _ in triples)
    logits = trainer_model(torch.tensor([SEQUENCE + out["output_ids"]])).logits[0]
    expected = torch.log_softmax(logits[len(SEQUENCE) - 1:-1], -1)
    expected = expected.gather(-1, torch.tensor(out["output_ids"])[:, None])[:, 0]
    assert torch.allclose(torch.tensor([lp for lp, _, _ in triples]), expected, atol=1e-4)


def test_server_state_accessors(service, trainer_model) -> None:
    assert service.get_dp_size() == 2 and service.get_tp_size() == 1
    assert service.flush_cache() is True
    metadata = service.get_model_metadata()
    params = dict(trainer_model.named_parameters())
    assert set(metadata) == set(params)
    for name, (dtype, shape) in metadata.items():
        assert dtype == torch.float32 and shape == params[name].shape
    assert isinstance(service.get_master_port(), int)
    assert service.get_master_address() == "127.0.0.1"


def test_update_weights_reaches_both_engines(synced_service, trainer_model,
                                             llama_path) -> None:
    service = synced_service
    perturbed = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    service.update_weights(perturbed.named_parameters(), weight_version="v1")
    expected = _prompt_logprobs(perturbed, SEQUENCE)
    for url in service.engine_urls():
        got = requests.post(url + "/generate", json={
            "input_ids": SEQUENCE, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1}}, proxies=NO_PROXY, timeout=60).json()
        assert got["meta_info"]["weight_version"] == "v1"
        engine = torch.tensor([lp for lp, _, _ in got["meta_info"]["input_token_logprobs"][1:]])
        assert torch.allclose(engine, expected, atol=1e-4)
    service.update_weights(trainer_model.named_parameters(), weight_version="v0")


def test_update_weights_from_distributed_then_broadcast(synced_service, trainer_model) -> None:
    service = synced_service
    name = "model.norm.weight"
    new = torch.full_like(dict(trainer_model.named_parameters())[name], 0.5)
    service.update_weights_from_distributed(name, new.dtype, tuple(new.shape))
    torch.distributed.broadcast(new, src=0, group=service.weight_group)
    service.finish_weight_update()
    for url in service.engine_urls():
        got = requests.post(url + "/get_weights_by_name", json={"name": name},
                            proxies=NO_PROXY, timeout=30).json()
        assert torch.allclose(torch.tensor(got).flatten(), new.flatten()[:len(
            torch.tensor(got).flatten())])
    service.update_weights(trainer_model.named_parameters(), weight_version="v0")


def test_shutdown_stops_the_managed_fleet(llama_path) -> None:
    service = RolloutService.from_pretrained(str(llama_path), dtype="float32",
                                             max_total_tokens=2048)
    url = service.server_url
    assert requests.get(url + "/health", proxies=NO_PROXY, timeout=5).ok
    service.shutdown()
    service.shutdown()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", proxies=NO_PROXY, timeout=5)


def _prompt_logprobs(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]


def test_shutdown_stops_the_fleet_even_when_leaving_the_weight_group_fails() -> None:
    """An engine that died (or refused an announced tensor) makes leaving the group fail;
    the managed processes must still be stopped, not left running until interpreter exit."""
    from rollserve.rl import WeightSyncError

    class DeadEngineSync:
        def destroy(self) -> None:
            raise WeightSyncError("engine http://127.0.0.1:1 unreachable")

    class Fleet:
        stopped = 0

        def shutdown(self) -> None:
            self.stopped += 1

    def refused() -> None:
        raise WeightSyncError("engine refused the announced tensor")

    for pending in (None, refused):
        service = RolloutService.__new__(RolloutService)
        fleet = Fleet()
        service._sync, service._pending, service._fleet = DeadEngineSync(), pending, fleet
        with pytest.raises(WeightSyncError):
            service.shutdown()
        assert fleet.stopped == 1
        service.shutdown()  # nothing left to stop or leave
        assert fleet.stopped == 1
