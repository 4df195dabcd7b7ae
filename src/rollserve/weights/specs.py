"""Tensor specs of SGLang's weight-update protocol and their validation against an engine's
parameter table.

Shared by both sides on purpose: the engine refuses a bad update before it receives anything,
and the trainer runs the same check first, so it never broadcasts into an engine that would
refuse (a refused engine does not join the broadcast, which would leave the trainer waiting).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rollserve.models.llama import EMBED_NAME
from rollserve.utils.dtypes import dtype_name, parse_dtype

LM_HEAD_NAME = "lm_head.weight"


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def parse_specs(names: Any, dtypes: Any, shapes: Any) -> list[TensorSpec]:
    """The request's parallel lists as specs; raises ValueError naming the bad entry."""
    for field, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if not isinstance(value, list):
            raise ValueError(f"'{field}' must be a list")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(
            f"'names', 'dtypes' and 'shapes' differ in length "
            f"({len(names)}, {len(dtypes)}, {len(shapes)})"
        )
    specs = []
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, got {name!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"tensor {name!r}: shape must be a list of sizes, got {shape!r}")
        try:
            parsed = parse_dtype(dtype)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        specs.append(TensorSpec(name, parsed, tuple(shape)))
    return specs


@dataclass(slots=True, frozen=True)
class ParameterTable:
    """An engine's parameters by Hugging Face name: what a weight update may carry.

    With tied embeddings the model has no `lm_head.weight`; an update may still carry it
    (HF state dicts do), shaped like the embedding, and it is ignored, as SGLang does: the
    embedding is the output projection."""

    params: dict[str, TensorSpec]
    tie_word_embeddings: bool

    @classmethod
    def of(cls, specs: Iterable[TensorSpec], tie_word_embeddings: bool) -> ParameterTable:
        return cls({spec.name: spec for spec in specs}, tie_word_embeddings)

    def target(self, name: str) -> TensorSpec | None:
        """The parameter a tensor named `name` updates (for a tied lm_head: the embedding)."""
        if name == LM_HEAD_NAME and self.tie_word_embeddings:
            return self.params.get(EMBED_NAME)
        return self.params.get(name)

    def check(self, specs: Iterable[TensorSpec]) -> None:
        """Raise ValueError naming the first tensor this engine would refuse: an unknown name,
        a shape that differs from the parameter's, a non-floating dtype, a repeated name.
        Floating dtypes other than the parameter's are accepted and cast on load."""
        seen: set[str] = set()
        for spec in specs:
            target = self.target(spec.name)
            if spec.name in seen:
                raise ValueError(f"tensor {spec.name!r} appears twice in one update")
            seen.add(spec.name)
            if target is None:
                raise ValueError(
                    f"tensor {spec.name!r} is not a parameter of this model (parameters use "
                    f"Hugging Face names, e.g. {EMBED_NAME!r})"
                )
            if spec.shape != target.shape:
                raise ValueError(
                    f"tensor {spec.name!r} has shape {list(spec.shape)}, the model's parameter "
                    f"has {list(target.shape)}"
                )
            if not spec.dtype.is_floating_point:
                raise ValueError(
                    f"tensor {spec.name!r} has dtype {dtype_name(spec.dtype)}; weights must be "
                    f"floating point (they are cast to the model's {dtype_name(target.dtype)})"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "tie_word_embeddings": self.tie_word_embeddings,
            "parameters": [{"name": s.name, "dtype": dtype_name(s.dtype), "shape": list(s.shape)}
                           for s in self.params.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParameterTable:
        params = {p["name"]: TensorSpec(p["name"], parse_dtype(p["dtype"]), tuple(p["shape"]))
                  for p in data["parameters"]}
        return cls(params, bool(data["tie_word_embeddings"]))
