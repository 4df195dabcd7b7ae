"""`RolloutService`: seed 002's RL service API over rollserve (or SGLang) servers.

    service = RolloutService.from_pretrained(model_path, dp_size=2)   # or .connect(url)
    out = service.generate(["a", "b"], {"max_tokens": 16}, return_logprobs=True)
    service.init_weight_update_group()
    service.update_weights(policy.named_parameters())

Unlike the anchor it is modelled on: sampling parameters always travel under
`sampling_params` (never silently ignored at the top level), logprob triples are
`(logprob, token_id, text)`, `update_weights` works end to end and reaches every engine
behind a router, and `get_model_metadata` reads the real parameter table from the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import torch

from rollserve.client import InferenceHTTPClient, InferenceHTTPError
from rollserve.cluster.local_fleet import LocalFleet
from rollserve.engine.sampling_params import to_sglang_names
from rollserve.models.catalog import DEFAULT_MODEL
from rollserve.rl.weight_sync import WeightSync, WeightSyncError
from rollserve.utils.process import free_port
from rollserve.weights.specs import ParameterTable, TensorSpec


class RolloutService:
    """Generation + weight sync against one URL: an engine server or a router.

    `server_url`: an existing server (or router). Otherwise `model_path` (a directory, a .gguf
    file or a model name; default: rollserve's default model) starts a managed fleet:
    `dp_size` engines (behind an sglang-router when dp_size > 1), stopped on
    `shutdown()` or at interpreter exit. `server_kwargs` are `ServerArgs` fields.
    """

    def __init__(self, server_url: str | None = None, model_path: str | None = None,
                 tp_size: int = 1, dp_size: int = 1, timeout: float = 300.0,
                 **server_kwargs: Any) -> None:
        if server_url is not None and model_path is not None:
            raise ValueError("pass server_url (connect) or model_path (managed), not both")
        self.timeout = timeout
        self._fleet: LocalFleet | None = None
        self._sync: WeightSync | None = None
        self._pending: Callable[[], None] | None = None  # answers to announced tensors
        self._master_address = "127.0.0.1"
        self._master_port: int | None = None
        if server_url is None:
            self._fleet = LocalFleet(str(model_path or DEFAULT_MODEL), dp_size=dp_size,
                                     tp_size=tp_size, **server_kwargs)
            server_url = self._fleet.url
        self._url = server_url.rstrip("/")
        self._client = InferenceHTTPClient(self._url)
        if not self._client.health():
            self.shutdown()
            raise ConnectionError(f"no healthy rollserve/SGLang server at {self._url}")

    @classmethod
    def connect(cls, server_url: str) -> RolloutService:
        """Use a running server or router; ConnectionError if it does not answer."""
        return cls(server_url=server_url)

    @classmethod
    def from_pretrained(cls, model_name: str = DEFAULT_MODEL, tp_size: int = 1, dp_size: int = 1,
                        **kwargs: Any) -> RolloutService:
        """Start a managed fleet of `dp_size` engines of `model_name` (a checkpoint directory,
        a .gguf file or a model name)."""
        return cls(model_path=model_name, tp_size=tp_size, dp_size=dp_size, **kwargs)

    @property
    def server_url(self) -> str:
        return self._url

    # ---- generation ----------------------------------------------------------------------

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: dict[str, Any] | None = None, *,
                 input_ids: list[int] | list[list[int]] | None = None,
                 return_logprobs: bool = False, return_text: bool = True,
                 timeout: float | None = None, **kwargs: Any) -> dict[str, Any] | list[dict]:
        """Text prompts XOR token ids, one or a batch; returns `{text, output_ids, meta_info}`
        (a list for a batch, in input order). `kwargs` are merged into `sampling_params`;
        OpenAI's names are accepted for SGLang's (`max_tokens` for `max_new_tokens`, ...).
        With `return_logprobs`, meta_info carries `output_token_logprobs` as
        (logprob, token_id, text) triples."""
        if (prompts is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompts and input_ids")
        params = to_sglang_names({**(sampling_params or {}), **kwargs})
        single = isinstance(prompts, str) or (
            input_ids is not None and all(isinstance(t, int) for t in input_ids))
        items = [prompts] if isinstance(prompts, str) else prompts
        ids = [input_ids] if input_ids is not None and single else input_ids
        results = self._run(self._client.async_generate_many(
            items, ids, params, return_logprob=return_logprobs, max_concurrency=256),
            timeout or self.timeout)
        if not return_text:
            for result in results:
                result.pop("text", None)
        return results[0] if single else results

    def generate_batch(self, prompts: list[str], sampling_params: dict[str, Any] | None = None,
                       **kwargs: Any) -> list[dict[str, Any]]:
        """`generate` for a list of prompts; always returns a list."""
        return self.generate(list(prompts), sampling_params, **kwargs)

    def _run(self, coroutine: Any, timeout: float) -> Any:
        async def run() -> Any:
            try:
                return await asyncio.wait_for(coroutine, timeout)
            finally:
                await self._client.aclose()  # the session belongs to this loop only

        return asyncio.run(run())

    # ---- server state --------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Flush the prefix cache of every engine (a router fans the call out)."""
        try:
            self._client.post("/flush_cache", {})
        except InferenceHTTPError:
            return False
        return True

    def engine_urls(self) -> list[str]:
        """The engines behind this URL: the router's workers, or the server itself."""
        try:
            workers = self._client.get("/workers").get("workers")
        except InferenceHTTPError:
            return [self._url]
        return [w["url"] for w in workers] if workers is not None else [self._url]

    def get_tp_size(self) -> int:
        return int(InferenceHTTPClient(self.engine_urls()[0]).get("/get_server_info")
                   .get("tp_size") or 1)

    def get_dp_size(self) -> int:
        return len(self.engine_urls())

    def get_master_address(self) -> str:
        return self._master_address

    def get_master_port(self) -> int:
        if self._master_port is None:
            self._master_port = free_port(self._master_address)
        return self._master_port

    def get_model_metadata(self) -> dict[str, tuple[torch.dtype, torch.Size]]:
        """The served model's parameters: name -> (dtype, shape), read from the server."""
        table = ParameterTable.from_json(
            InferenceHTTPClient(self.engine_urls()[0]).get("/get_weights_metadata"))
        return {spec.name: (spec.dtype, torch.Size(spec.shape)) for spec in table.params.values()}

    # ---- weight sync ---------------------------------------------------------------------

    def init_weight_update_group(self, master_address: str | None = None,
                                 master_port: int | None = None, *,
                                 backend: str | None = None) -> None:
        """One group: this process at rank 0 and every engine's ranks after it. `backend`
        defaults to NCCL when CUDA is available here, gloo otherwise."""
        if self._sync is not None:
            raise RuntimeError("the weight update group is already initialised")
        self._master_address = master_address or self._master_address
        self._master_port = master_port or self.get_master_port()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        sync = WeightSync(self.engine_urls(), master_address=self._master_address,
                          master_port=self._master_port, backend=backend)
        sync.init()
        self._sync = sync

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *,
                       weight_version: str | None = None) -> None:
        """Push every (name, tensor) to every engine; the prefix caches are flushed."""
        self.finish_weight_update()
        self._require_sync().push(weights, weight_version=weight_version)

    def update_weights_from_distributed(self, name: str, dtype: torch.dtype,
                                        shape: tuple[int, ...]) -> None:
        """Tell every engine to receive one tensor, then return: the caller broadcasts it
        from rank 0 with `torch.distributed.broadcast(tensor, src=0,
        group=service.weight_group)`. The engines' answers are checked by the next weight
        call (or `finish_weight_update()`); a refusal raises WeightSyncError there."""
        self.finish_weight_update()
        spec = TensorSpec(name, dtype, tuple(shape))
        self._pending = self._require_sync().announce([spec], flush_cache=False)

    def finish_weight_update(self) -> None:
        """Wait for the engines' answers to announced tensors (see above)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    @property
    def weight_group(self) -> torch.distributed.ProcessGroup:
        return self._require_sync().group

    def _require_sync(self) -> WeightSync:
        if self._sync is None:
            raise WeightSyncError("call init_weight_update_group() first")
        return self._sync

    def shutdown(self) -> None:
        """Leave the weight group and stop the managed fleet, if any; safe to call twice.
        The fleet is stopped even when leaving the group fails (that error is raised after)."""
        try:
            if self._sync is not None:
                sync, self._sync = self._sync, None
                try:
                    self.finish_weight_update()
                finally:
                    self._pending = None
                    sync.destroy()
        finally:
            if self._fleet is not None:
                fleet, self._fleet = self._fleet, None
                fleet.shutdown()

    def __enter__(self) -> RolloutService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
