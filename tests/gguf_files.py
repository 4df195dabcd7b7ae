"""Small GGUF files for tests of `.gguf` model paths (helpers only, no tests here).

rollserve turns a GGUF file into an HF checkpoint with transformers' own GGUF loading
(`from_pretrained(dir, gguf_file=name)`), so these files are written the way llama.cpp's
`convert_hf_to_gguf.py` writes them, with the `gguf` package's writer, architecture names and
tensor-name maps: float32 tensors under GGUF names, the q/k rows of "llama"-architecture files
permuted into llama.cpp's rotary layout (transformers un-permutes them on load), the
hyperparameters under `<arch>.*` keys, and the byte-level BPE tokenizer and chat template
under `tokenizer.*` keys. Special ids follow llama.cpp too: eos and padding are the
tokenizer's (`<|im_end|>`, `<|endoftext|>`), bos the config's, as the tokenizer has none; so
a loaded config's eos_token_id is `<|im_end|>`, where the checkpoint's config.json says
`<|endoftext|>`.

What transformers 5.x's GGUF loader (its legacy path, which reads these architectures) does
not carry back, whatever a file holds:

- Mistral. transformers switches a "llama" file to Mistral only when `general.name` is exactly
  "mistral" (it tests `"mistral" in [name]`, list membership), and then fails to load it:
  it looks "mistral" up in gguf-py's architecture names, which have no such entry
  (`NotImplementedError: Unknown gguf model_type: mistral in gguf-py`, with gguf 0.19). So
  `write_gguf_model` names Mistral files "mistral" as that convention asks, and such a file
  does not load; under any other name (as real Mistral GGUFs have, "Mistral 7B ...") the
  same file loads as LlamaForCausalLM with the same weights.
- head_dim for qwen3. transformers reads `attention.key_length` for qwen3_moe, not qwen3, so
  Qwen3Config's default head_dim (128) applies unless the caller passes the file's
  key_length as `head_dim=`; the "qwen3" preset's is 32 (hidden 64 / 4 heads would be 16).
- RoPE scaling. No `rope.scaling.*` key is read and the `rope_freqs` tensor is skipped, so
  the "llama" preset (llama3 scaling) and the "mistral" one (linear, factor 2) load with plain
  RoPE. The files still hold what llama.cpp writes (`rope_freqs` for llama3, `rope.scaling.*`
  for linear), for a reader that restores it.
- A sliding window: none is read for llama or mistral. The tiny presets have none.

The tokenizer's pre-tokenizer is named by the split regex transformers applies to the source
checkpoint: "qwen2" where AutoTokenizer gives a Qwen2Tokenizer (for qwen2 it does, whatever
tokenizer.json says), GPT-2's otherwise, which is the one the tiny tokenizer was trained with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import load_file

from rollserve.models.make_tiny import build_tokenizer


def write_gguf_model(hf_dir: Path, out_file: Path, *, name: str | None = None) -> Path:
    """Export a `make_tiny_model` checkpoint directory to one float32 GGUF file at `out_file`.

    `name` is `general.name`; by default "mistral" for a Mistral checkpoint (transformers' cue
    for Mistral, see the module docstring) and "tiny-<model_type>" otherwise.
    """
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        weights.update(load_file(shard))
    if name is None:
        name = "mistral" if config.model_type == "mistral" else f"tiny-{config.model_type}"
    return _write_model(out_file, name, config, weights, tokenizer)


def write_vocab_only_gguf(out_file: Path) -> Path:
    """A GGUF file with an architecture and a tokenizer but no tensors, like llama.cpp's
    `ggml-vocab-*.gguf` files: valid GGUF, yet not a model."""
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("tiny-vocab")
    tokenizer = build_tokenizer()
    _add_tokenizer(writer, tokenizer, bos_token_id=tokenizer.pad_token_id)
    return _finish(writer, out_file)


def write_unsupported_arch_gguf(out_file: Path) -> Path:
    """A small random-weight Phi-3 GGUF model: transformers loads it, rollserve runs no phi3.

    Phi-3 has the llama hyperparameter keys and no tensor transform in transformers' loader,
    so it takes the same path as the tiny checkpoints; its q/k/v and gate/up are fused, so it
    is not a llama in disguise either.
    """
    tokenizer = build_tokenizer()
    config = transformers.Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    weights = transformers.Phi3ForCausalLM(config).state_dict()
    return _write_model(out_file, "tiny-phi3", config, weights, tokenizer)


def _write_model(
    out_file: Path,
    name: str,
    config: transformers.PretrainedConfig,
    weights: dict[str, torch.Tensor],
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> Path:
    # llama.cpp has no mistral architecture: Mistral files say "llama".
    arch_name = "llama" if config.model_type == "mistral" else config.model_type
    arch = next(arch for arch, known in gguf.MODEL_ARCH_NAMES.items() if known == arch_name)
    writer = gguf.GGUFWriter(out_file, arch_name)
    writer.add_name(name)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer, bos_token_id=config.bos_token_id)
    _add_tensors(writer, arch, config, weights)
    return _finish(writer, out_file)


def _head_dim(config: transformers.PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config: transformers.PretrainedConfig) -> dict:
    # transformers 5 keeps theta and scaling in `rope_parameters`, 4.x in two attributes.
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return dict(rope)
    return {"rope_theta": config.rope_theta, **(getattr(config, "rope_scaling", None) or {})}


def _add_hyperparameters(writer: gguf.GGUFWriter, config: transformers.PretrainedConfig) -> None:
    """The keys llama.cpp writes for these models; transformers maps most of them back."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # read back as head_dim for llama/mistral; key_length is llama.cpp's own head size key
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if getattr(config, "sliding_window", None) is not None:
        writer.add_sliding_window(config.sliding_window)


def _add_tokenizer(
    writer: gguf.GGUFWriter,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    bos_token_id: int | None,
) -> None:
    """The byte-level BPE as llama.cpp's "gpt2" tokenizer model, ids and chat template included."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    added = tokenizer.added_tokens_decoder
    # CONTROL tokens are the ones transformers re-adds as special when it loads the file.
    token_types = [
        gguf.TokenType.NORMAL
        if index not in added
        else (gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        for index in range(len(tokens))
    ]
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    # tokenizers >= 0.20 saves merges as pairs, older versions as "a b" strings
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    is_qwen2 = isinstance(tokenizer, getattr(transformers, "Qwen2Tokenizer", ()))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if is_qwen2 else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        bos_token_id = tokenizer.bos_token_id
    if bos_token_id is not None:
        writer.add_bos_token_id(bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # the tiny tokenizer prepends nothing
    writer.add_chat_template(tokenizer.chat_template)


def _add_tensors(
    writer: gguf.GGUFWriter,
    arch: gguf.MODEL_ARCH,
    config: transformers.PretrainedConfig,
    weights: dict[str, torch.Tensor],
) -> None:
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in weights.items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output tensor for tied embeddings
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} of a {arch.name} model")
        data = tensor.to(torch.float32).numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(gguf_name, data)
    if _rope_parameters(config).get("rope_type") == "llama3":
        rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(rope_freqs, _llama3_rope_factors(config))


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's two rotary halves become interleaved pairs,
    the inverse of transformers' `LlamaTensorProcessor._reverse_permute_weights`."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama3_rope_factors(config: transformers.PretrainedConfig) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as `rope_freqs` for llama3 RoPE scaling."""
    rope = _rope_parameters(config)
    head_dim = _head_dim(config)
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    old_context = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _finish(writer: gguf.GGUFWriter, out_file: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_file)
