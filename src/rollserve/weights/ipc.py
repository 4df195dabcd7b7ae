"""SGLang's `serialized_named_tensors` for `/update_weights_from_tensor` (same host only).

A payload is base64 text of a `ForkingPickler` dump of either a list of (name, tensor) pairs
or, with `load_format="flattened_bucket"`, `{"flattened_tensor": t, "metadata": [...]}`.
Tensors travel as shared-memory handles, not bytes. Across unrelated processes only torch's
`file_system` sharing strategy works (the default `file_descriptor` one needs a parent/child
relation), so `serialize_named_tensors` uses it; the sender must keep its tensors alive until
the engine has answered.

Deserialising only admits torch's tensor/storage rebuilders (no arbitrary pickle globals),
with storages pickled by value loaded as `weights_only` data.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing as mp

NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass
class FlattenedTensorMetadata:
    """SGLang's bucket entry (a plain dataclass: pickles restore it from a state dict)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def serialize_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One `serialized_named_tensors` entry. Moves the tensors' storages into shared memory."""
    buffer = io.BytesIO()
    with _sharing_strategy("file_system"):
        ForkingPickler(buffer).dump([(name, tensor) for name, tensor in named_tensors])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def check_payload_count(payloads: list[str], tp_size: int) -> None:
    """SGLang's `serialized_named_tensors` holds one payload per tensor-parallel rank; one
    for all ranks is taken too."""
    if len(payloads) not in (1, tp_size):
        raise ValueError(f"'serialized_named_tensors' holds {len(payloads)} payloads, but "
                         f"this engine has tp_size={tp_size}: send one per tensor-parallel "
                         "rank (or one for all)")


def deserialize_named_tensors(payload: str | bytes, load_format: str | None) -> NamedTensors:
    if isinstance(payload, str):
        try:
            payload = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"serialized tensors are not valid base64: {exc}") from None
    try:
        value = _RestrictedUnpickler(io.BytesIO(payload)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise ValueError(f"cannot deserialize the named tensors: {exc}") from None
    except RuntimeError as exc:  # a handle that does not open
        raise ValueError(f"cannot open the serialized tensors: {exc} (a serialization opens "
                         "once: serialize the tensors again for every process that reads "
                         "them, e.g. once per tensor-parallel rank)") from None
    if load_format == "flattened_bucket":
        return _unflatten(value)
    if not (isinstance(value, list | tuple) and all(_is_named_tensor(p) for p in value)):
        raise ValueError("serialized tensors must be a list of (name, tensor) pairs")
    return [(name, tensor) for name, tensor in value]


def _unflatten(value: Any) -> NamedTensors:
    flat = value.get("flattened_tensor") if isinstance(value, dict) else None
    metadata = value.get("metadata") if isinstance(value, dict) else None
    if not isinstance(flat, torch.Tensor) or not isinstance(metadata, list):
        raise ValueError("a flattened_bucket payload is {'flattened_tensor', 'metadata'}")
    out = []
    for meta in metadata:
        if not isinstance(meta, FlattenedTensorMetadata):
            raise ValueError("flattened_bucket metadata must be FlattenedTensorMetadata entries")
        out.append((meta.name, flat[meta.start_idx : meta.end_idx].reshape(meta.shape)
                    .to(meta.dtype)))
    return out


def _is_named_tensor(pair: Any) -> bool:
    return (isinstance(pair, list | tuple) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], torch.Tensor))


@contextlib.contextmanager
def _sharing_strategy(strategy: str) -> Iterator[None]:
    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy(strategy)
    try:
        yield
    finally:
        mp.set_sharing_strategy(previous)


def _load_storage_from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch.multiprocessing.reductions", name): getattr(mp.reductions, name)
    for name in ("rebuild_tensor", "rebuild_cuda_tensor", "rebuild_typed_storage",
                 "rebuild_storage_filename", "rebuild_storage_empty")
} | {
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "Size"): torch.Size,
    ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
    ("torch.storage", "TypedStorage"): torch.TypedStorage,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "FlattenedTensorMetadata":  # SGLang's class, wherever it was defined
            return FlattenedTensorMetadata
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a tensor payload")
        return allowed
