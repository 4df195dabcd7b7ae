"""The engine's tensor work runs on its own thread (Engine._run says why: OpenMP teams)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from rollserve import Engine
from rollserve.engine import engine as engine_module
from rollserve.weights.updater import WeightUpdater

ENGINE_THREAD = "rollserve-engine"


def test_the_model_loads_and_update_casts_run_on_the_engine_thread(
        llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: dict[str, set[str]] = {"load": set(), "prepare": set()}
    load_model, prepare = engine_module.load_model, WeightUpdater.prepare

    def recording_load(*args, **kwargs):
        threads["load"].add(threading.current_thread().name)
        return load_model(*args, **kwargs)

    def recording_prepare(self, *args, **kwargs):
        threads["prepare"].add(threading.current_thread().name)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(engine_module, "load_model", recording_load)
    monkeypatch.setattr(WeightUpdater, "prepare", recording_prepare)
    with Engine(str(llama_path), dtype="bfloat16", device="cpu", max_total_tokens=1024) as engine:
        # float32 tensors into a bf16 engine: the cast is the update's tensor work.
        weights = [(name, w.float() * 0.5)
                   for name, w in engine.model.checkpoint_weights().items()]
        engine.update_weights_from_tensor(weights, weight_version="halved")
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
    assert threads == {"load": {ENGINE_THREAD}, "prepare": {ENGINE_THREAD}}
    assert out["meta_info"]["weight_version"] == "halved"
    assert weights[0][1].dtype == torch.float32  # the sender's tensors were copied, not cast


def test_a_checkpoint_that_fails_to_load_raises_from_the_constructor(
        llama_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = _engine_threads()
    with pytest.raises(Exception, match=r"(?i)safetensor|header|deserializ"):
        Engine(str(broken), dtype="float32", device="cpu", max_total_tokens=1024)
    assert _engine_threads() == before  # the failed engine's thread has ended


def _engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == ENGINE_THREAD}
