"""`ServerArgs`: `EngineArgs` plus the HTTP server's own settings, with SGLang's flag names,
as a dataclass and as a command line (`--model-path`, `--tp-size`, ...). Unknown keys and
flags are errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollserve.engine.args import EngineArgs
from rollserve.engine.sampling_params import SamplingParams

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(slots=True)
class ServerArgs(EngineArgs):
    """Every EngineArgs field (the engine's settings), then the server's."""

    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None
    chat_template: str | None = None  # a Jinja template string or a path to one
    api_key: str | None = None
    enable_metrics: bool = False
    preferred_sampling_params: str | None = None  # JSON object: defaults for requests
    log_level: str = "info"
    skip_server_warmup: bool = False
    max_request_bytes: int = 32 * 2**20

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        self.preferred_sampling_defaults()  # validates the JSON early
        _check_chat_template(self.chat_template)
        self._resolve_model()  # after the cheap checks: a first use converts the model
        self.validate()  # engine settings fail here, before anything starts

    def _resolve_model(self) -> None:
        """A name or .gguf file becomes the local checkpoint it stands for (EngineArgs does
        that); clients keep calling the model by the name the server was given."""
        given = self.model_path
        # Explicitly: zero-argument super() fails in a slots dataclass before Python 3.14.
        EngineArgs.__post_init__(self)
        if self.model_path != given and self.served_model_name is None:
            self.served_model_name = given

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
        """The engine's part alone: the engine process gets no server settings (API key)."""
        names = [f.name for f in dataclasses.fields(EngineArgs)]
        return EngineArgs(**{name: getattr(self, name) for name in names})

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
