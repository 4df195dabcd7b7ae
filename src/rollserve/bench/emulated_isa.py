"""Benchmarks as on a CPU with fewer instruction sets than this one: `--emulate-isa avx2` runs
rollserve and its vLLM peer on AVX2 + FMA only, a stand-in for the AVX2-only machines (AMD
EPYC without AVX-512) on a machine that has AVX-512.

Every process of both engines keeps to the ISA: rollserve's kernels (ROLLSERVE_CPU_ISA),
PyTorch's own kernels (ATEN_CPU_CAPABILITY) and oneDNN's matmuls (ONEDNN_MAX_CPU_ISA), all
read once, at first use, hence the benchmark re-runs itself with them set. Both engines also
decide by torch.cpu's AVX-512/AMX probes (rollserve its `auto` dtype and AMX kernel, vLLM its
kernel library, vllm._C_AVX2 or an AVX-512 one, and its attention code), so a sitecustomize
on PYTHONPATH makes those answer False in every process. oneDNN's bf16 probe keeps its answer
(replacing an op breaks torch's export code in vLLM), so rollserve in bf16, not its `auto`
dtype here, still packs bf16 weights as it would not on such a CPU. Caches, memory bandwidth
and clocks stay this CPU's: the figures stand in for the AVX2-only machine, they do not
measure it.
"""

from __future__ import annotations

import argparse
import os
import sys

from rollserve.utils.cache import cache_dir

# What each emulated ISA sets in every process of both engines.
SETTINGS: dict[str, dict[str, str]] = {
    "avx2": {"ROLLSERVE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# Set with the sitecustomize on PYTHONPATH: the three variables alone, typed by hand, leave
# the probes as they are, so they do not count as the emulation.
MARKER = "ROLLSERVE_EMULATED_ISA"
# Imported first by every Python process that has its folder on PYTHONPATH (pip's too, while
# vLLM's venv is built before torch is in it: hence the guard). Every probe of torch.cpu but
# AVX2's answers False. A sitecustomize this one shadows (a distribution's, a venv's) runs
# after it, as Python would have run it.
_SITECUSTOMIZE = '''"""rollserve.bench.emulated_isa: as on a CPU without AVX-512 or AMX."""
import importlib.machinery
import importlib.util
import os
import sys

try:
    import torch.cpu
except ImportError:
    pass
else:
    for _probe in dir(torch.cpu):
        if _probe.startswith("_is_") and _probe.endswith("_supported") \\
                and _probe != "_is_avx2_supported":
            setattr(torch.cpu, _probe, lambda: False)

# The sitecustomize this one shadows: the first in the entries after the last one that is this
# file's folder (compared as real paths), so never this file again, however often (or under
# whatever names) its folder is listed.
_here = os.path.realpath(os.path.dirname(__file__))
_real = [os.path.realpath(entry or os.curdir) for entry in sys.path]
_after = len(_real) - _real[::-1].index(_here) if _here in _real else len(_real)
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path[_after:])
if _spec is not None and _spec.loader is not None:
    _shadowed = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shadowed)
'''


def add_emulate_isa(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--emulate-isa", choices=sorted(SETTINGS),
                        help="run both engines as on a CPU with only this instruction set "
                             "(bench.emulated_isa): a stand-in for such a machine")


def run_emulated(isa: str | None, module: str, argv: list[str] | None) -> None:
    """Replaces this process by `python -m module argv` (None: this command line's) in
    `isa`'s emulation, unless it is in force already (or `isa` is None). Every process it
    starts inherits the emulation."""
    if isa is None or emulated() == isa:
        return
    print(f"emulating {isa}: re-running with {describe(isa)}", flush=True)
    args = sys.argv[1:] if argv is None else argv
    os.execve(sys.executable, [sys.executable, "-m", module, *args], emulation_env(isa))


def emulation_env(isa: str) -> dict[str, str]:
    """This process's environment with `isa`'s settings and the probes' sitecustomize."""
    folder = cache_dir() / "emulated-isa"
    folder.mkdir(parents=True, exist_ok=True)
    site = folder / "sitecustomize.py"
    if not site.is_file() or site.read_text() != _SITECUSTOMIZE:
        staging = folder / f"sitecustomize.{os.getpid()}.tmp"  # a reader never sees half
        staging.write_text(_SITECUSTOMIZE)
        staging.replace(site)
    path = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, **SETTINGS[isa], MARKER: isa, "PYTHONPATH": os.pathsep.join(path)}


def emulated() -> str | None:
    """The ISA this process emulates (its settings all in force, set by emulation_env), if
    any."""
    isa = os.environ.get(MARKER)
    settings = SETTINGS.get(isa or "", {})
    in_force = settings and all(os.environ.get(key) == value for key, value in settings.items())
    return isa if in_force else None


def describe(isa: str) -> str:
    """The emulation's settings, as they would be typed in a shell."""
    return " ".join(f"{key}={value}" for key, value in SETTINGS[isa].items()) + \
        " and torch.cpu's AVX-512/AMX probes answering False"
