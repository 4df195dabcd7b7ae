"""Per-request sampling parameters, with SGLang's names, defaults and validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GREEDY_TEMPERATURE = 1e-5  # at or below this, sampling is argmax


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int | None = 128  # None: up to the context length (resolved per prompt)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None) -> SamplingParams:
        """Build from a request's dict; an unknown key or a bad value raises ValueError."""
        params = dict(params or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown sampling parameter(s): {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(known))}"
            )
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        for key in ("stop", "stop_token_ids"):
            if params.get(key) is None:
                params.pop(key, None)
        sampling = cls(**params)
        sampling.validate()
        return sampling

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        if self.max_new_tokens is not None:
            _check_type("max_new_tokens", self.max_new_tokens, int)
            _check(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
        _check_type("min_new_tokens", self.min_new_tokens, int)
        _check_type("top_k", self.top_k, int)
        _check_type("n", self.n, int)
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                     "repetition_penalty"):
            _check_type(name, getattr(self, name), (int, float))
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
            _check_type(name, getattr(self, name), bool)
        if self.sampling_seed is not None:
            _check_type("sampling_seed", self.sampling_seed, int)
            # torch.Generator takes [-2**63, 2**64); n > 1 samples add their index to it.
            _check(-2**63 <= self.sampling_seed < 2**63, "sampling_seed",
                   "must be in [-2**63, 2**63)")
        _check(self.min_new_tokens >= 0, "min_new_tokens", "must be >= 0")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 or >= 1")
        _check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        _check(0 < self.repetition_penalty <= 2, "repetition_penalty", "must be in (0, 2]")
        _check(self.n >= 1, "n", "must be >= 1")
        _check(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop", "must be a non-empty string or a list of non-empty strings",
        )
        _check(
            isinstance(self.stop_token_ids, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids),
            "stop_token_ids", "must be a list of token ids",
        )
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            _check(not bad, "stop_token_ids", f"ids outside the vocabulary: {bad}")


SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
# OpenAI's names for SGLang sampling parameters; every other parameter is spelled alike in
# both APIs.
OPENAI_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "seed": "sampling_seed", "min_tokens": "min_new_tokens"}
# The sampling parameters an OpenAI request may carry: SGLang's own extras (top_k, min_p,
# ignore_eos, ...) as well, but not the SGLang names of those OpenAI spells its own way.
OPENAI_SAMPLING_FIELDS = frozenset(OPENAI_NAMES) | (SAMPLING_FIELDS - set(OPENAI_NAMES.values()))


def to_sglang_names(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with OpenAI's names (max_tokens, seed, ...) turned into SGLang's; other keys
    are kept as given (SamplingParams.from_dict rejects unknown ones). An OpenAI name given
    together with the SGLang name it stands for is refused (ValueError); of two OpenAI names
    for one parameter (max_tokens, max_completion_tokens) the later in `params` wins."""
    renamed: dict[str, Any] = {}
    for key, value in params.items():
        name = OPENAI_NAMES.get(key, key)
        if name != key and name in params:
            raise ValueError(f"pass {key} or {name}, not both")
        renamed[name] = value
    return renamed


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"sampling parameter {name!r} {message}")


def _check_type(name: str, value: object, kinds: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ValueError(f"sampling parameter {name!r} must be {_kind_name(kinds)}, got a bool")
    if not isinstance(value, kinds):
        raise ValueError(
            f"sampling parameter {name!r} must be {_kind_name(kinds)}, "
            f"got {type(value).__name__}"
        )


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(k.__name__ for k in kinds)
