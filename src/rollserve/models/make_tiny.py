"""Build small random-weight HuggingFace checkpoints offline, for tests and demos.

A checkpoint made here is an ordinary HF model directory (safetensors weights, config.json,
generation_config.json, tokenizer.json, tokenizer_config.json with a ChatML chat template),
so both rollserve's engine and `transformers` load it with `from_pretrained(path)`. Nothing is
downloaded: the byte-level BPE tokenizer is trained on a corpus embedded in this module, and
the weights are random but deterministic for a given preset and seed.

    python -m rollserve.models.make_tiny /tmp/tiny-llama --preset llama --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Merges stop here or when the corpus runs out of pairs; the special tokens come on top.
BPE_VOCAB_SIZE = 1536

SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX_FILE = "model.safetensors.index.json"

DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
)

# ChatML as Qwen models use it. Assistant tool calls are rendered Qwen-style in <tool_call>
# tags; list-valued content (the multimodal message format) keeps only its text parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('Unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- if message['content'] or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call -%}"
    "{%- set arguments = call['arguments'] if call['arguments'] is string"
    " else call['arguments'] | tojson -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": '"
    " + arguments + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Varied plain English (plus digits, punctuation, code, and multibyte UTF-8) so the BPE learns
# real-looking subwords and byte sequences of every UTF-8 length appear in the training data.
CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time, in a small village at the edge of a great forest, there lived an old
clockmaker named Elias. Every morning he opened the shutters of his shop, swept the floor,
and wound each of the forty-two clocks that hung on the walls. The children of the village
liked to press their noses against the window and watch the pendulums swing back and forth.
"Why do you keep so many clocks?" asked a girl one day. Elias smiled and said, "Because
each one tells a different story, and I have not finished listening to any of them yet."

Machine learning is the study of algorithms that improve through experience. A language
model assigns probabilities to sequences of tokens; given a prompt, it predicts the next
token, appends it, and repeats. Sampling with a temperature of 0.7 makes the output more
varied, while greedy decoding always picks the most likely token. Reinforcement learning
from human feedback fine-tunes a model with rewards, and the rollouts are generated in
large batches so that the accelerator stays busy. Throughput is measured in tokens per
second; latency is measured in milliseconds. A cache of keys and values avoids recomputing
attention over the prefix, and paged memory lets many requests share one pool of blocks.

Recipe for a simple bread: mix 500 g of flour, 10 g of salt, 7 g of dried yeast and 350 ml
of warm water. Knead for 10 minutes, let it rise for 1 hour, shape the loaf, and bake at
220 degrees for 30 to 35 minutes. Let it cool before slicing! Serve with butter, honey, or
a bowl of hot soup. My grandmother always said that patience is the secret ingredient.

Weather report: on Monday, 3 March 2025, the temperature rose from -2 to 14 degrees. Winds
blew at 25 km/h from the north-west; rain is expected on Tuesday and Wednesday. Thursday
will be sunny, with clear skies until the evening. Friday: cloudy. Saturday & Sunday: mild.

Questions and answers. Q: What is the capital of France? A: Paris. Q: How many days are in
a leap year? A: 366. Q: What is 12 times 12? A: 144. Q: Who wrote "Pride and Prejudice"?
A: Jane Austen. Q: What colour is the sky on a clear day? A: Blue. Q: Is water wet? A: Yes,
mostly. Q: What is the square root of 81? A: 9. Q: Which planet is the largest? A: Jupiter.

def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")

{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}
<tool_call> [1, 2, 3] (a + b) * c / d - e % f == g != h <= i >= j && k || !l; x = y[0];
https://example.com/path?query=value&other=42#section   user@example.org   C:\\Users\\demo

Dear team, thank you for your hard work this quarter. Our revenue grew by 18%, costs fell by
4.5%, and we shipped three major releases. Please submit your expense reports by Friday, and
remember that the office will be closed on the 24th, 25th and 26th of December. Best wishes,
and happy holidays to you and your families. Kind regards, Margaret.

The café on the corner serves a naïve but charming crème brûlée; the façade is painted
jaune, and the owner, Zoë, speaks French, Spanish and a little German: "Grüß Gott!" she says,
"¿Qué tal?" and "À bientôt!" Prices are in euros (€4.50) or pounds (£3.90), never in yen (¥).
In Japanese, 日本語 means the Japanese language; 東京 is Tokyo and こんにちは means hello.
In Chinese, 你好世界 means hello world. Привет, мир! Γειά σου κόσμε! مرحبا بالعالم! שלום!
Emoji appear everywhere now: 🙂 😀 🚀 🎉 ❤️ 👍 🐍 🔥 ✨ — even in commit messages like "fix 🐛".
Math symbols: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14159, √2 ≈ 1.41421, 2³ = 8, ½ + ¼ = ¾, ±5°C.

A short poem:
The river runs beneath the hill,
the evening air is cool and still;
the lanterns glow, the swallows fly,
and stars come out across the sky.

History lesson: in 1492 Columbus sailed the ocean blue; in 1969 two astronauts walked on the
Moon; in 1989 the Berlin Wall came down; and in 2007 the first smartphone with a multi-touch
screen changed how people used the internet. Technology keeps moving faster, and every new
generation of computers brings more memory, more cores, and more speed than the one before.

How to be a good listener: look at the person who is speaking, do not interrupt, ask open
questions, and repeat back what you heard in your own words. People feel respected when they
are heard. Good conversations are like a game of catch: each side throws and each side
catches. Kindness costs nothing, yet it is worth more than gold.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 100 128 256 512 1000 1024 2048 4096
65536 1,000,000 3.5 -7 +12 1e-6 0x1F 2^10 99.9% 12:30 2024-06-01 +1 (555) 010-9999 #1 $20.
Punctuation: commas, periods. Semicolons; colons: dashes - and -- and — ellipses... quotes
'single' "double" «guillemets» “curly” ‘apostrophes’ (parentheses) [brackets] {braces} <angle>
slashes / \\ pipes | tildes ~ carets ^ underscores _ asterisks * at signs @ hashes # dollars $.

Story continued: when winter came, the clockmaker grew tired, and the girl began to help him
in the shop. She learned to open the backs of the clocks, to clean the gears with a soft
brush, and to listen for the tiny tick that meant everything was right again. Years later,
when people asked her why she kept so many clocks, she smiled and gave the same answer he had
given her, because some stories are meant to be told more than once.

Instructions for the assistant: answer the user's question briefly and politely. If you do not
know the answer, say so. Use tools when they help: call the calculator for arithmetic, the
search tool for recent events, and the weather tool for forecasts. Always think step by step,
check your work, and write clear, correct, well-tested code. Hello! How can I help you today?
Sure, here is a summary of the document. I'm sorry, but I can't help with that. Let's begin.
"""


@dataclass(slots=True, frozen=True)
class Preset:
    """Architecture and dimensions of one checkpoint kind.

    `vocab_size=None` means "exactly the tokenizer's size". `rope_scaling` holds the HF
    rope-scaling dict as key/value pairs (empty for plain RoPE) so that presets stay immutable.
    """

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rope_theta: float
    tie_word_embeddings: bool
    head_dim: int | None = None
    rope_scaling: tuple[tuple[str, float | str], ...] = ()
    vocab_size: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    # Measured on the tiny presets: at 0.2 greedy top-1/top-2 logit gaps have a median of ~0.3
    # and float32 greedy decoding matched float64 on every probe prompt, while text stays
    # varied; at 0.1 the tied-embedding presets get stuck repeating one token.
    initializer_range: float = 0.2
    default_dtype: str = "float32"


_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}

PRESETS: dict[str, Preset] = {
    "llama": Preset(
        LlamaConfig,
        LlamaForCausalLM,
        **_TINY,
        num_key_value_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rope_scaling=(
            ("rope_type", "llama3"),
            ("factor", 8.0),
            ("low_freq_factor", 1.0),
            ("high_freq_factor", 4.0),
            ("original_max_position_embeddings", 256),
        ),
    ),
    "qwen2": Preset(
        Qwen2Config,
        Qwen2ForCausalLM,
        **_TINY,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3": Preset(
        Qwen3Config,
        Qwen3ForCausalLM,
        **_TINY,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        head_dim=32,
    ),
    "mistral": Preset(
        MistralConfig,
        MistralForCausalLM,
        **_TINY,
        num_key_value_heads=1,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rope_scaling=(("rope_type", "linear"), ("factor", 2.0)),
    ),
    "qwen2.5-0.5b": Preset(
        Qwen2Config,
        Qwen2ForCausalLM,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        vocab_size=151936,
        max_position_embeddings=32768,
        initializer_range=0.02,
        default_dtype="bfloat16",
    ),
}


@dataclass(slots=True, frozen=True)
class SpecialTokenIds:
    """Ids of the ChatML special tokens in the tokenizer built by `build_tokenizer`."""

    endoftext: int
    im_start: int
    im_end: int


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on `CORPUS` and wrap it for `transformers`.

    The `tokenizers` BPE trainer breaks frequency ties by token id, so the result is the same
    on every call and in every process.
    """
    backend = _train_bpe()
    # Added after training so they get the highest ids, as in Qwen's vocabulary.
    backend.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        # Byte-level BPE round-trips text exactly; the legacy clean-up would rewrite " ." etc.
        clean_up_tokenization_spaces=False,
    )


def _train_bpe() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Keeps offsets pointing at the original characters rather than the byte-level alphabet.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        # All 256 bytes, so any UTF-8 input encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return backend


def special_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> SpecialTokenIds:
    """Look up the ChatML special tokens' ids in `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return SpecialTokenIds(endoftext=ids[0], im_start=ids[1], im_end=ids[2])


def make_tiny_model(
    path: str | os.PathLike[str],
    preset: str = "llama",
    seed: int = 0,
    *,
    dtype: str | None = None,
    num_shards: int = 1,
) -> pathlib.Path:
    """Write a random-weight checkpoint of `preset` to `path` and return the path.

    `dtype=None` uses the preset's default (float32 for the tiny presets). The weights depend
    only on `preset` and `seed`: the same arguments give byte-identical safetensors files.
    `num_shards > 1` writes a sharded checkpoint with a `model.safetensors.index.json`.
    """
    spec = _resolve_preset(preset)
    torch_dtype = _resolve_dtype(dtype or spec.default_dtype)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    out = pathlib.Path(path)
    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    config = _build_config(spec, spec.vocab_size or len(tokenizer), ids)
    model = _build_model(spec, config, seed, torch_dtype)
    # save_pretrained removes stale shard files but not a stale index, which would point a
    # loader at deleted shards when `path` held a sharded checkpoint before.
    (out / SHARDED_INDEX_FILE).unlink(missing_ok=True)
    model.save_pretrained(out)
    if num_shards > 1:
        _reshard(out, list(model.state_dict()), num_shards)
    _generation_config(ids).save_pretrained(out)
    # Inline in tokenizer_config.json, where readers of classic HF checkpoints look for it,
    # instead of transformers 5's separate chat_template.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return out


def _resolve_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid dtypes: {', '.join(DTYPES)}")
    return DTYPES[name]


def _build_config(preset: Preset, vocab_size: int, ids: SpecialTokenIds) -> PretrainedConfig:
    optional: dict[str, Any] = {}
    if preset.head_dim is not None:
        optional["head_dim"] = preset.head_dim
    if preset.rope_scaling:
        optional["rope_scaling"] = dict(preset.rope_scaling)
    return preset.config_class(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=preset.rms_norm_eps,
        rope_theta=preset.rope_theta,
        initializer_range=preset.initializer_range,
        tie_word_embeddings=preset.tie_word_embeddings,
        # Every preset uses full attention; Mistral's config would default to a 4096 window.
        sliding_window=None,
        bos_token_id=ids.endoftext,
        eos_token_id=ids.endoftext,
        pad_token_id=ids.endoftext,
        **optional,
    )


def _build_model(
    preset: Preset, config: PretrainedConfig, seed: int, dtype: torch.dtype
) -> PreTrainedModel:
    # Initialised in float32 whatever the target dtype, so a bfloat16 checkpoint holds exactly
    # the rounded weights of the float32 one with the same seed.
    torch.manual_seed(seed)
    model = preset.model_class(config)
    return model.to(dtype).eval()


def _reshard(directory: pathlib.Path, names_in_order: list[str], num_shards: int) -> None:
    """Split the single `model.safetensors` into exactly `num_shards` files plus an index.

    save_pretrained's `max_shard_size` packs tensors greedily, and total/num_shards as the limit
    misses the count on small checkpoints (2 asked gave 3 files, 7 gave 4); tests of sharded
    loading want the exact count.
    Starting from save_pretrained's file keeps its choice of tensors (tied weights left out).
    """
    single = directory / SINGLE_WEIGHTS_FILE
    with safe_open(single, framework="pt") as reader:
        metadata = reader.metadata()
        # safe_open objects are not iterable, so .keys() is needed here.
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    # Model order keeps each layer's tensors together and in sequence, as HF's shards do.
    names = [name for name in names_in_order if name in tensors]
    groups = _split_evenly(names, [tensors[name].nbytes for name in names], num_shards)
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
        save_file({name: tensors[name] for name in group}, directory / filename, metadata)
        weight_map.update(dict.fromkeys(group, filename))
    index = {
        "metadata": {"total_size": sum(tensor.nbytes for tensor in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / SHARDED_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()


def _split_evenly(names: list[str], sizes: list[int], num_groups: int) -> list[list[str]]:
    """Cut `names` into `num_groups` non-empty runs of roughly equal total size."""
    if num_groups > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {num_groups} shards")
    total = sum(sizes)
    groups: list[list[str]] = [[]]
    filled = 0
    for position, (name, size) in enumerate(zip(names, sizes, strict=True)):
        names_left = len(names) - position
        groups_left = num_groups - len(groups)
        full = filled >= total * len(groups) / num_groups
        # Start the next shard once this one holds its share, or when every remaining tensor
        # is needed to keep the remaining shards non-empty.
        if groups[-1] and groups_left and (full or names_left == groups_left):
            groups.append([])
        groups[-1].append(name)
        filled += size
    return groups


def _generation_config(ids: SpecialTokenIds) -> GenerationConfig:
    # Chat turns end with <|im_end|>, raw completions with <|endoftext|>: stop on either.
    return GenerationConfig(
        bos_token_id=ids.endoftext,
        eos_token_id=[ids.im_end, ids.endoftext],
        pad_token_id=ids.endoftext,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: build a checkpoint and print its path."""
    args = _parse_args(argv)
    path = make_tiny_model(
        args.path, args.preset, args.seed, dtype=args.dtype, num_shards=args.num_shards
    )
    print(path)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rollserve.models.make_tiny",
        description="Build a small random-weight HF checkpoint with a real tokenizer, offline.",
    )
    parser.add_argument("path", help="output directory")
    parser.add_argument("--preset", default="llama", choices=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: the preset's dtype"
    )
    parser.add_argument("--num-shards", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
