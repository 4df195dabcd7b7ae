"""Build a CausalLM from a local Hugging Face checkpoint directory (safetensors only)."""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from rollserve.models.config import ModelConfig, load_model_config
from rollserve.models.llama import CausalLM
from rollserve.models.parallel import SINGLE, TensorParallel
from rollserve.utils.dtypes import dtype_name

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return auto_dtype(DTYPES.get(config.torch_dtype or "float32", torch.float32), device)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def auto_dtype(checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype, except a 16-bit one on a CPU that only emulates it: there a
    forward's linears at 64 rows run 3.2x (bf16) and 6.5x (fp16) slower than in float32
    (BENCHMARKS.md, "On a CPU without native bf16"), so the engine computes in float32, at
    twice the memory. An explicit dtype is always honoured."""
    if device.type != "cpu" or cpu_computes_natively(checkpoint_dtype):
        return checkpoint_dtype
    name = dtype_name(checkpoint_dtype)
    logger.info("this CPU has no native %s arithmetic: computing in float32 (ask for dtype %s "
                "to keep the checkpoint's)", name, name)
    return torch.float32


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this x86 CPU has instructions for `dtype` matmuls (bf16: AVX512-BF16 or AMX;
    fp16: AVX512-FP16, AVX-NE-CONVERT or AMX-FP16). Other architectures are taken to."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported() or torch.cpu._is_amx_fp16_supported()
    return True


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    """cpu, or a CUDA device with its index (`gpu_id` where `device` names none)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unsupported device {device!r}; choose auto, cpu or cuda")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", gpu_id)
    return resolved


def load_model(
    model_path: str | Path, dtype: torch.dtype, device: torch.device, max_positions: int,
    tp: TensorParallel = SINGLE,
) -> CausalLM:
    """The checkpoint's model, or rank `tp.rank`'s share of it."""
    config = load_model_config(model_path)
    with torch.device("meta"):
        model = CausalLM(config, max_positions, tp)
    model = model.to_empty(device=device).to(dtype=dtype)
    model.model.embed_tokens.weight.data.zero_()  # a vocab shard's padding rows stay zero
    # The rope tables are computed, not loaded; they stay float32 for exact angles.
    model.model.rotary.build_tables(device)
    load_weights(model, iter_checkpoint_tensors(model_path))
    model.repack_weights()
    return model.eval()


def load_weights(model: CausalLM, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy every checkpoint tensor (this rank's part of it) into the model where it lives
    (model.slots); all must match. The caller repacks afterwards (model.repack_weights())."""
    missing = set(model.slots)
    for name, tensor in tensors:
        slot = model.slots.get(name)
        if slot is None:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # some tied checkpoints still carry a copy of the embedding
            raise ValueError(f"checkpoint tensor {name!r} matches no weight of the model")
        if tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                f"model expects {slot.shape}"
            )
        with torch.no_grad():
            model.load_weight(name, tensor)
        missing.discard(name)
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {', '.join(sorted(missing))}")


def iter_checkpoint_tensors(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(Path(model_path)):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, reader.get_tensor(name)


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights found in {path}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard listed in the index is missing: {file}")
    return files
