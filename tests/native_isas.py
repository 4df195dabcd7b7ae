"""The instruction sets the native-kernel tests run for: every one this CPU runs, so an
AVX-512 machine checks its AVX2 builds too and an AVX2-only machine its AVX2 ones. ISAS is a
list of pytest params (one skipped param where no kernel can be built here)."""

from __future__ import annotations

import os
import shutil

import pytest

from rollserve.kernels.build import runnable_isas

HAS_COMPILER = shutil.which(os.environ.get("CC", "gcc")) is not None


def _isa_params() -> list:
    if not HAS_COMPILER:
        reason = "no C compiler: the engine uses the PyTorch path"
    elif not runnable_isas():
        reason = "neither AVX2 nor AVX-512 here: the engine uses the PyTorch path"
    else:
        return [pytest.param(isa, id=isa) for isa in runnable_isas()]
    return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-isa")]


ISAS = _isa_params()
