"""Torch dtypes by name, in SGLang's and Hugging Face's spellings."""

from __future__ import annotations

from typing import Any

import torch


def parse_dtype(value: Any) -> torch.dtype:
    """A torch dtype from SGLang's spelling: "bfloat16", "torch.bfloat16", "half", ..."""
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
