"""GGUF files as model paths: each is converted once, through transformers' own GGUF loading,
into an ordinary checkpoint (config.json, safetensors, tokenizer files with the chat
template) in rollserve's cache, keyed by the file's content hash.

The weights are stored in the file's natural float dtype: that of its float tensors when it
holds only F32, F16 or BF16 ones, float32 when any is quantized, since a dequantized value
(a 16-bit scale times a small integer, plus a 16-bit offset) is exact only in float32. The
checkpoint is then the model transformers computes with when it loads the GGUF file.

Two facts transformers' GGUF loading (5.x) drops are restored from the file here: a qwen3
file's head size (`attention.key_length`; transformers falls back to Qwen3's default of 128)
and linear RoPE scaling (`rope.scaling.*`). Llama-3-style RoPE scaling survives in a GGUF
file only as a per-dimension `rope_freqs` tensor, from which the scaling parameters cannot
be recovered: such files are refused rather than converted into a different model. A file
whose `general.name` is exactly "mistral" does not load in transformers at all; real
Mistral files carry longer names and load as the Llama architecture they are.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from rollserve.models.local_cache import build_once, file_sha256, models_dir

logger = logging.getLogger(__name__)

# GGUF's names of the architectures the engine runs (Mistral files say "llama").
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def ensure_converted(gguf_file: Path) -> Path:
    """The cached checkpoint converted from `gguf_file`, converting it on first use."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    stem = gguf_file.name.removesuffix(".gguf")
    target = models_dir() / f"{stem}-{file_sha256(gguf_file)[:16]}"
    return build_once(target, lambda staging: convert(gguf_file, staging),
                      f"conversion of {gguf_file.name}")


def convert(gguf_file: Path, out_dir: Path) -> None:
    """Write the checkpoint of `gguf_file` into `out_dir`."""
    reader = _read(gguf_file)  # checks that the file is a model we run
    rope_scaling = _rope_scaling(reader)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s into an HF checkpoint (once; later uses load the cached "
                   "copy)", gguf_file)
    start = time.perf_counter()
    source = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=natural_dtype(reader),
                                                 **_config_overrides(reader))
    # The tensors are dequantized now: save an ordinary checkpoint, not a GGUF-backed one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if rope_scaling:
        _add_rope_scaling(out_dir / "config.json", rope_scaling)
    logger.warning("converted %s in %.1f s", gguf_file.name, time.perf_counter() - start)


def natural_dtype(reader) -> torch.dtype:  # reader: gguf.GGUFReader
    """The dtype the checkpoint keeps (module docstring)."""
    from gguf import GGMLQuantizationType

    float_types = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16:
                   torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}
    weights = [t for t in reader.tensors if len(t.shape) > 1]
    kinds = {float_types.get(t.tensor_type) for t in weights}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else torch.float32


def _config_overrides(reader) -> dict[str, int]:
    if _field(reader, "general.architecture") != "qwen3":
        return {}
    head_dim = _field(reader, "qwen3.attention.key_length")
    return {} if head_dim is None else {"head_dim": int(head_dim)}


def _rope_scaling(reader) -> dict[str, float | str] | None:
    """The file's RoPE scaling as config.json states it; ValueError where it cannot be
    restored (module docstring)."""
    architecture = _field(reader, "general.architecture")
    kind = _field(reader, f"{architecture}.rope.scaling.type") or "none"
    if any(tensor.name == "rope_freqs.weight" for tensor in reader.tensors):
        kind = "llama3 (a rope_freqs tensor)"
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear",
                "factor": float(_field(reader, f"{architecture}.rope.scaling.factor"))}
    raise ValueError(f"this GGUF file uses {kind} RoPE scaling, which cannot be restored from a "
                     "GGUF file; serve the model's HF checkpoint instead")


def _add_rope_scaling(config_file: Path, scaling: dict[str, float | str]) -> None:
    """transformers >= 5 states RoPE in `rope_parameters`, older versions in `rope_scaling`."""
    config = json.loads(config_file.read_text())
    key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    config[key] = {**(config.get(key) or {}), **scaling}
    config_file.write_text(json.dumps(config, indent=2))


def _field(reader, key: str) -> str | int | float | None:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _read(gguf_file: Path):  # -> gguf.GGUFReader
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError...
        raise ValueError(f"{gguf_file} is not a readable GGUF file ({exc})") from None
    architecture = _field(reader, "general.architecture")
    if architecture is None or not reader.tensors:
        raise ValueError(f"{gguf_file} is a GGUF file but holds no model weights "
                         "(no architecture or no tensors: a vocabulary-only file?)")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{gguf_file}: GGUF architecture {architecture!r} is not supported; "
                         f"rollserve runs {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return reader
