"""The packaged launch config (`configs/launch.yaml`) outside `rollserve launch`.

`load_config` gives a driver script the `cfg` that `rollserve launch` would run with the same
overrides (seed 004's driver needs one), and `register_resolvers` the `rollserve.*`
interpolations the file uses, which `rollserve launch` registers when it starts.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "rollserve.cluster.configs"
CONFIG_NAME = "launch"


def load_config(overrides: Sequence[str] | None = None) -> DictConfig:
    """`launch.yaml` with command-line style overrides (`key=value`, `+key=value`, `~key`).

    Composed by Hydra, as `rollserve launch` composes it, but without a Hydra job: `log_dir`
    then defaults to a temporary directory made once per process (see `output_dir`).
    """
    register_resolvers()
    with hydra.initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra.compose(CONFIG_NAME, overrides=list(overrides or []))


def register_resolvers() -> None:
    """Registers `${rollserve.output_dir:}`; idempotent. (Models need no resolver: a model
    name such as `random-qwen2` is itself a model path, rollserve.models.catalog.)"""
    OmegaConf.register_new_resolver("rollserve.output_dir", output_dir, replace=True)


def output_dir() -> str:
    """Hydra's output directory in a Hydra job (`rollserve launch`, `hydra.run.dir=...`);
    elsewhere one temporary directory per process, so every engine of a driver logs there."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.output_dir)
    return _process_dir()


@functools.cache
def _process_dir() -> str:
    return tempfile.mkdtemp(prefix="rollserve-")
