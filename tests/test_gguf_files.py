"""The GGUF files of `gguf_files` load back through transformers' GGUF loading unchanged.

Each tiny checkpoint goes to GGUF and back through `from_pretrained(dir, gguf_file=name)`, the
path rollserve converts `.gguf` model paths with; what transformers cannot carry back is
listed in `gguf_files`' docstring and is checked or skipped here with that reason.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import transformers
from gguf_files import write_gguf_model, write_unsupported_arch_gguf, write_vocab_only_gguf
from safetensors.torch import load_file

from rollserve.models.make_tiny import build_tokenizer

SAMPLE_TEXTS = (
    "Hello world! How can I help you today?",
    "12345 it's 3.14159, 2024-06-01 and 0x1F",
    "  leading spaces\n\n\ttabs   and  gaps",
    "café 日本語 🚀 Привет",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
)

MISTRAL_FAILS = (
    "transformers loads a 'llama' GGUF as Mistral only when general.name is exactly 'mistral', "
    "then raises NotImplementedError: gguf-py (0.19) has no 'mistral' architecture name to map "
    "its tensors with; see test_a_tiny_mistral_checkpoint_under_a_real_world_name_loads_as_llama"
)


def _load(gguf_file: Path, **config_overrides: object):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, **config_overrides
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name
    )
    return model, tokenizer


def _field(gguf_file: Path, key: str) -> object:
    return gguf.GGUFReader(gguf_file).get_field(key).contents()


def _head_dim(config: transformers.PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _assert_round_trip(hf_dir: Path, model, tokenizer, *, architecture: str | None = None) -> None:
    original = transformers.AutoConfig.from_pretrained(hf_dir)
    loaded = model.config
    assert type(model).__name__ == (architecture or original.architectures[0])
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(loaded, key) == getattr(original, key), key
    assert _head_dim(loaded) == _head_dim(original)
    assert getattr(loaded, "sliding_window", None) == getattr(original, "sliding_window", None)
    assert loaded.rope_parameters["rope_theta"] == original.rope_parameters["rope_theta"]
    assert loaded.rms_norm_eps == pytest.approx(original.rms_norm_eps)  # stored as float32

    weights = load_file(hf_dir / "model.safetensors")
    state = model.state_dict()
    assert set(weights) <= set(state)
    for name, tensor in weights.items():
        assert state[name].dtype == torch.float32, name
        assert torch.equal(state[name], tensor), name

    source = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in SAMPLE_TEXTS:
        assert tokenizer(text).input_ids == source(text).input_ids, text
    assert tokenizer.chat_template == source.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == (source.eos_token, source.pad_token)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == source.apply_chat_template(
        messages, tokenize=False
    )


@pytest.mark.parametrize(
    "preset", ["llama", "qwen2", pytest.param("mistral", marks=pytest.mark.skip(MISTRAL_FAILS))]
)
def test_a_tiny_checkpoint_round_trips_through_transformers_gguf_loading(
    preset: str, tiny_model_factory, tmp_path: Path
) -> None:
    hf_dir = tiny_model_factory(preset)
    gguf_file = write_gguf_model(hf_dir, tmp_path / f"{preset}.gguf")
    _assert_round_trip(hf_dir, *_load(gguf_file))


def test_a_tiny_qwen3_checkpoint_round_trips_when_the_loader_is_given_the_files_head_dim(
    tiny_model_factory, tmp_path: Path
) -> None:
    """transformers ignores qwen3.attention.key_length (gguf_files' docstring): passing it as
    head_dim is all it takes, q/k norms included."""
    hf_dir = tiny_model_factory("qwen3")
    gguf_file = write_gguf_model(hf_dir, tmp_path / "qwen3.gguf")
    head_dim = int(_field(gguf_file, "qwen3.attention.key_length"))
    assert head_dim == 32
    model, tokenizer = _load(gguf_file, head_dim=head_dim)
    _assert_round_trip(hf_dir, model, tokenizer)
    assert any(name.endswith("self_attn.q_norm.weight") for name in model.state_dict())


def test_a_tiny_mistral_checkpoint_under_a_real_world_name_loads_as_llama(
    tiny_model_factory, tmp_path: Path
) -> None:
    hf_dir = tiny_model_factory("mistral")
    gguf_file = write_gguf_model(hf_dir, tmp_path / "mistral.gguf", name="Tiny Mistral")
    assert _field(gguf_file, "general.architecture") == "llama"
    _assert_round_trip(hf_dir, *_load(gguf_file), architecture="LlamaForCausalLM")


def test_the_files_keep_rope_scaling_the_way_llama_cpp_writes_it(
    tiny_model_factory, tmp_path: Path
) -> None:
    llama = write_gguf_model(tiny_model_factory("llama"), tmp_path / "llama.gguf")
    rope_freqs = {t.name: t for t in gguf.GGUFReader(llama).tensors}["rope_freqs.weight"]
    # llama3 scaling: high frequencies untouched, the lowest divided by the full factor 8
    assert rope_freqs.data[0] == 1.0 and rope_freqs.data[-1] == 8.0
    mistral = write_gguf_model(tiny_model_factory("mistral"), tmp_path / "mistral.gguf")
    assert _field(mistral, "llama.rope.scaling.type") == "linear"
    assert _field(mistral, "llama.rope.scaling.factor") == 2.0
    assert _field(mistral, "general.name") == "mistral"


def test_a_vocab_only_file_has_a_tokenizer_and_no_tensors(tmp_path: Path) -> None:
    gguf_file = write_vocab_only_gguf(tmp_path / "vocab.gguf")
    reader = gguf.GGUFReader(gguf_file)
    assert not reader.tensors
    assert reader.get_field("general.architecture").contents() == "llama"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    source = build_tokenizer()
    for text in SAMPLE_TEXTS:
        assert tokenizer(text).input_ids == source(text).input_ids, text


def test_an_unsupported_architecture_file_is_a_phi3_model_transformers_loads(
    tmp_path: Path,
) -> None:
    gguf_file = write_unsupported_arch_gguf(tmp_path / "phi3.gguf")
    assert _field(gguf_file, "general.architecture") == "phi3"
    model, tokenizer = _load(gguf_file)
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model.config.hidden_size == 32
    assert tokenizer("hello world").input_ids == build_tokenizer()("hello world").input_ids
