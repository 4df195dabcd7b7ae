"""`ServerArgs`: SGLang's flag names for everything the engine supports, as a dataclass and
as a command line (`--model-path`, `--tp-size`, ...). Unknown keys and flags are errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollserve.engine.args import DEFAULT_CHUNKED_PREFILL_SIZE, EngineArgs
from rollserve.engine.sampling_params import SamplingParams
from rollserve.models.catalog import DEFAULT_MODEL, resolve_model

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(slots=True)
class ServerArgs:
    model_path: str = DEFAULT_MODEL  # a directory, a .gguf file or a name (`rollserve models`)
    tokenizer_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    dtype: str = "auto"
    device: str = "auto"
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int = 256
    context_length: int | None = None
    chunked_prefill_size: int = DEFAULT_CHUNKED_PREFILL_SIZE
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    random_seed: int = 0
    disable_native_kernels: bool = False
    stream_interval: int = 1
    served_model_name: str | None = None
    chat_template: str | None = None  # a Jinja template string or a path to one
    api_key: str | None = None
    enable_metrics: bool = False
    preferred_sampling_params: str | None = None  # JSON object: defaults for requests
    log_level: str = "info"
    skip_server_warmup: bool = False
    max_request_bytes: int = 32 * 2**20

    def __post_init__(self) -> None:
        if self.tp_size != 1:
            raise ValueError(
                f"tp_size={self.tp_size}: tensor parallelism is not implemented yet; use 1 "
                "(scale out with more engines behind the router instead)"
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        self.preferred_sampling_defaults()  # validates the JSON early
        _check_chat_template(self.chat_template)
        self._resolve_model()  # last: a first use converts the model
        self.engine_args().validate()  # engine settings fail here, before anything starts

    def _resolve_model(self) -> None:
        """A name or .gguf file becomes the local checkpoint it stands for; clients keep
        calling the model by the name the server was given."""
        resolved = resolve_model(self.model_path)
        if resolved != self.model_path and self.served_model_name is None:
            self.served_model_name = self.model_path
        self.model_path = resolved
        if self.tokenizer_path is not None:
            self.tokenizer_path = resolve_model(self.tokenizer_path)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path

    def preferred_sampling_defaults(self) -> dict[str, Any]:
        if not self.preferred_sampling_params:
            return {}
        try:
            value = json.loads(self.preferred_sampling_params)
        except json.JSONDecodeError as exc:
            raise ValueError(f"preferred_sampling_params is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("preferred_sampling_params must be a JSON object")
        try:
            SamplingParams.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preferred_sampling_params: {exc}") from exc
        return value

    def engine_args(self) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        return EngineArgs(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["api_key"] = None if self.api_key is None else "***"
        return data

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> ServerArgs:
        parser = build_parser()
        namespace = parser.parse_args(argv)
        try:
            return cls(**vars(namespace))
        except ValueError as exc:
            parser.error(str(exc))  # exits with status 2 and the usage line


def is_inline_template(value: str) -> bool:
    """Whether a --chat-template value is Jinja source rather than a path (checked first: a
    long template is no valid file name, and Path.is_file raises on one)."""
    return "{{" in value or "{%" in value


def _check_chat_template(value: str | None) -> None:
    """A file, or a Jinja template given inline. Anything else (a mistyped path, one of
    SGLang's built-in template names) would become every chat prompt verbatim."""
    if value is None or is_inline_template(value) or Path(value).is_file():
        return
    raise ValueError(
        f"chat_template {value!r} is neither an existing file nor a Jinja template; built-in "
        "template names are not supported: pass a template file"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rollserve.launch_server",
        description="Serve one rollserve engine over HTTP (SGLang native + OpenAI APIs).",
    )
    hints = typing.get_type_hints(ServerArgs)
    for field in dataclasses.fields(ServerArgs):
        flag = "--" + field.name.replace("_", "-")
        kind = _scalar_type(hints[field.name])
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=field.default)
        elif field.default is dataclasses.MISSING:
            parser.add_argument(flag, type=kind, required=True)
        else:
            parser.add_argument(flag, type=kind, default=field.default)
    return parser


def _scalar_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
