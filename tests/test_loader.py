"""Checkpoint loading: supported architectures, sharded files, and clear failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollserve import Engine
from rollserve.models import loader
from rollserve.models.config import SUPPORTED_ARCHITECTURES, load_model_config
from rollserve.models.linear import can_pack


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_and_generates(tiny_model_factory) -> None:
    path = tiny_model_factory("qwen2", num_shards=2)
    assert (path / "model.safetensors.index.json").is_file()
    with Engine(str(path), device="cpu", max_total_tokens=256) as engine:
        out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4,
                              "ignore_eos": True})
    assert len(out["output_ids"]) == 4


def test_unsupported_architecture_lists_the_supported_ones(llama_path, tmp_path) -> None:
    path = _copy(llama_path, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        Engine(str(path), device="cpu", max_total_tokens=64)
    assert all(a in str(err.value) for a in SUPPORTED_ARCHITECTURES)


def test_missing_files_are_named(llama_path, tmp_path) -> None:
    with pytest.raises((FileNotFoundError, OSError), match="nowhere"):
        Engine(str(tmp_path / "nowhere"), device="cpu", max_total_tokens=64)
    path = _copy(llama_path, tmp_path / "noweights")
    for file in path.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Engine(str(path), device="cpu", max_total_tokens=64)


def test_shape_mismatch_names_the_tensor(llama_path, tmp_path) -> None:
    path = _copy(llama_path, tmp_path / "bad")
    file = next(path.glob("*.safetensors"))
    tensors = load_file(file)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name):
        Engine(str(path), device="cpu", max_total_tokens=64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtypes_load_and_generate(llama_path, dtype: str) -> None:
    with Engine(str(llama_path), dtype=dtype, device="cpu", max_total_tokens=128) as engine:
        assert engine.model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
        out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 3,
                              "ignore_eos": True})
    assert len(out["output_ids"]) == 3


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_keeps_a_16_bit_checkpoint_only_where_the_cpu_computes_it(
    tiny_model_factory, monkeypatch, native: bool
) -> None:
    config = load_model_config(tiny_model_factory("llama", dtype="bfloat16"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loader, "cpu_computes_natively", lambda dtype: native)
    assert loader.resolve_dtype("auto", config, cpu) == (torch.bfloat16 if native
                                                         else torch.float32)
    assert loader.resolve_dtype("bfloat16", config, cpu) == torch.bfloat16  # asked for: kept
    assert loader.resolve_dtype("auto", config, cuda) == torch.bfloat16


def test_engine_on_auto_computes_a_bf16_checkpoint_as_this_cpu_allows(tiny_model_factory) -> None:
    path = tiny_model_factory("llama", dtype="bfloat16")
    expected = torch.bfloat16 if loader.cpu_computes_natively(torch.bfloat16) else torch.float32
    with Engine(str(path), device="cpu", max_total_tokens=128) as engine:
        assert engine.dtype == expected
        assert engine.model.model.embed_tokens.weight.dtype == expected
        assert engine.pool.k_cache.dtype == expected


def test_fused_projections_hold_every_checkpoint_tensor_under_its_hugging_face_name(
        tiny_model_factory) -> None:
    path = tiny_model_factory("qwen2")  # q/k/v carry biases: fused too
    tensors = load_file(next(path.glob("*.safetensors")))
    model = loader.load_model(path, torch.float32, torch.device("cpu"), max_positions=64)
    weights = model.checkpoint_weights()
    tied_copy = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(weights) == set(tensors) - tied_copy
    for name, weight in weights.items():
        assert torch.equal(weight, tensors[name]), name
    assert model.slots["model.layers.0.self_attn.v_proj.bias"].param \
        == "model.layers.0.self_attn.qkv_proj.bias"


def test_installing_one_part_of_a_fused_projection_changes_only_its_rows(llama_path) -> None:
    model = loader.load_model(llama_path, torch.bfloat16, torch.device("cpu"), max_positions=64)
    fused = model.model.layers[1].mlp.gate_up_proj
    before = fused.weight.detach().clone()
    new = torch.randn_like(model.checkpoint_weight("model.layers.1.mlp.up_proj.weight"))
    free = model.install_weight("model.layers.1.mlp.up_proj.weight", new)
    half = before.shape[0] // 2
    assert free is new  # copied in: the caller may reuse it
    assert torch.equal(fused.weight[:half], before[:half])
    assert torch.equal(fused.weight[half:], new)
    assert fused.packed is None  # stale: dropped until repacked
    param = model.prepacked_param("model.layers.1.mlp.up_proj.weight")
    assert param == "model.layers.1.mlp.gate_up_proj.weight"
    model.repack_weight(param)
    assert (fused.packed is not None) == can_pack(fused.weight)
