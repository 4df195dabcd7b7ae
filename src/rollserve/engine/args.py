"""Engine construction arguments (SGLang's ServerArgs names for what the engine supports)."""

from __future__ import annotations

from dataclasses import dataclass

from rollserve.models.catalog import DEFAULT_MODEL, resolve_model

SCHEDULE_POLICIES = ("fcfs", "lpm")
DEFAULT_CHUNKED_PREFILL_SIZE = 4096


@dataclass(slots=True)
class EngineArgs:
    # A checkpoint directory, a .gguf file or a model name (`rollserve models`); resolved to
    # a local checkpoint directory on construction.
    model_path: str = DEFAULT_MODEL
    tokenizer_path: str | None = None  # default: model_path
    # Ranks per engine, one process each, the model and KV pool split across them (CPU: each
    # rank on its share of this process's cores).
    tp_size: int = 1
    dtype: str = "auto"  # auto (the checkpoint's), bfloat16, float16, float32
    device: str = "auto"  # auto (cuda when present), cpu, cuda
    # CUDA: rank 0 runs on GPU base_gpu_id, rank r on base_gpu_id + r (SGLang's name).
    base_gpu_id: int = 0
    mem_fraction_static: float | None = None  # default 0.85 on CUDA, 0.3 of free RAM on CPU
    max_total_tokens: int | None = None  # KV pool size in tokens; overrides the fraction
    max_running_requests: int = 256
    context_length: int | None = None  # default: the model's max_position_embeddings
    chunked_prefill_size: int = DEFAULT_CHUNKED_PREFILL_SIZE  # <= 0 disables chunking
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    random_seed: int = 0
    # Native CPU kernels (decode attention; fused norms, SwiGLU, rotary; sampling; AMX few-row
    # linears) are used where they apply; True keeps eager PyTorch ops and oneDNN everywhere
    # (same results within rounding).
    disable_native_kernels: bool = False
    # A streamed request reports its first token, then every stream_interval-th, and its
    # finish: fewer, larger updates for clients that do not need every token at once.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        self.model_path = resolve_model(self.model_path)
        if self.tokenizer_path is not None:
            self.tokenizer_path = resolve_model(self.tokenizer_path)

    def validate(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(
                f"schedule_policy must be one of {', '.join(SCHEDULE_POLICIES)}, "
                f"got {self.schedule_policy!r}"
            )
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {self.max_total_tokens}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if self.base_gpu_id < 0:
            raise ValueError(f"base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
