"""examples/grpo.py end to end on a tiny random-weight model: two GRPO steps against two
engines behind the router, after which every engine serves exactly the trainer's weights,
and the per-step log and the plot are written."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import requests
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "grpo.py"
NO_PROXY = {"http": None, "https": None}


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def served_tensor(url: str, name: str, rows: int) -> torch.Tensor:
    answer = requests.post(url + "/get_weights_by_name", json={"name": name,
                           "truncate_size": rows}, proxies=NO_PROXY, timeout=60)
    answer.raise_for_status()
    return torch.tensor(answer.json())


def test_two_grpo_steps_push_the_trainer_weights_into_every_engine(
        tiny_model_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grpo = load_example()
    # A random-weight model never answers a sum, so every advantage would be 0 and nothing
    # would change: reward odd-length replies instead, so that the step moves the weights.
    monkeypatch.setattr(grpo, "reward", lambda text, finished, answer: float(len(text) % 2))
    model_dir = str(tiny_model_factory("llama"))
    config = grpo.Config(model=model_dir, steps=2, prompts_per_step=2, group_size=4,
                         max_new_tokens=8, lr=1e-3, out=str(tmp_path / "out"))
    with grpo.start_service(model_dir, engines=2) as service:
        policy = grpo.run(config, service, model_dir)
        urls = service.engine_urls()
        assert len(urls) == 2
        initial = dict(grpo.load_policy(model_dir).named_parameters())
        trained = dict(policy.named_parameters())
        assert any(not torch.equal(trained[name], initial[name]) for name in trained)
        for url in urls:
            info = requests.get(url + "/get_server_info", proxies=NO_PROXY, timeout=60).json()
            assert info["weight_version"] == "step-2"
            for name, tensor in trained.items():
                served = served_tensor(url, name, rows=tensor.shape[0])
                # float32 -> JSON -> float32 round-trips exactly.
                assert torch.equal(served, tensor.detach()), (url, name)

    out = Path(config.out)
    with open(out / "log.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [0, 1]
    for row in rows:
        assert int(row["tokens_generated"]) > 0
        # The engines sampled with the weights the trainer had before its update.
        assert float(row["max_logprob_gap"]) < 1e-3
        assert all(float(row[key]) >= 0 for key in ("rollout_s", "train_s", "push_s"))
    assert (out / "grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
