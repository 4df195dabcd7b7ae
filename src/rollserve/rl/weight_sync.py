"""Trainer side of weight sync: push a model's weights into running engines over SGLang's
protocol.

    with WeightSync(router_url="http://127.0.0.1:30000") as sync:  # or WeightSync([url, ...])
        sync.push(model.named_parameters(), weight_version="step-10")

One process group holds the trainer (rank 0) and every engine (at rank_offset = 1 + the
tensor-parallel sizes of the engines before it). `push` first checks every tensor against each
engine's parameter table (`/get_weights_metadata`), so a push an engine would refuse fails
before anything is broadcast. Then, per bucket of about `bucket_bytes`, it POSTs
`/update_weights_from_distributed` to all engines at once and broadcasts the bucket's tensors
from rank 0 in order. rollserve engines stage every bucket but the last (`apply: false`) and
switch weights once, at the end, so every request sees one weight version. Engines without
`/get_weights_metadata` (real SGLang) are not checked locally and apply bucket by bucket.

An engine that refuses after the broadcast started does not join it; the broadcast then waits
until the group's `timeout`. The local checks exist so that this cannot happen for bad names,
shapes or dtypes.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from rollserve.client import InferenceHTTPClient, InferenceHTTPError
from rollserve.utils.dtypes import dtype_name
from rollserve.utils.process import free_port
from rollserve.weights.group import DEFAULT_TIMEOUT, destroy_weights_group, init_weights_group
from rollserve.weights.specs import ParameterTable, TensorSpec

T = TypeVar("T")
DEFAULT_BUCKET_BYTES = 512 * 2**20


class WeightSyncError(RuntimeError):
    """An engine refused or failed a weight-sync call; the message names the engine."""


@dataclass(slots=True)
class EngineHandle:
    url: str
    client: InferenceHTTPClient
    tp_size: int
    table: ParameterTable | None  # None: not a rollserve engine (no local checks, no staging)


@dataclass(slots=True)
class _Item:
    spec: TensorSpec  # name, wire dtype, shape
    tensor: torch.Tensor


class WeightSync:
    def __init__(
        self, engine_urls: Iterable[str] | None = None, *, router_url: str | None = None,
        master_address: str = "127.0.0.1", master_port: int | None = None,
        group_name: str = "rollserve_weights", backend: str = "gloo",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES, flatten: bool = False,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        """`flatten=True` sends each bucket as one tensor (SGLang's `flattened_bucket` load
        format; buckets then hold one dtype each) instead of one broadcast per tensor."""
        if (engine_urls is None) == (router_url is None):
            raise ValueError("pass exactly one of engine_urls and router_url")
        self.engine_urls = None if engine_urls is None else list(engine_urls)
        self.router_url = router_url
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.flatten = flatten
        self.timeout = timeout
        self.engines: list[EngineHandle] = []
        self._group: dist.ProcessGroup | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def init(self) -> None:
        """Build the group: every engine joins over HTTP while this process joins as rank 0."""
        if self._group is not None:
            raise RuntimeError("WeightSync is already initialised")
        self.engines = [self._describe(url) for url in self._resolve_urls()]
        world_size = 1 + sum(e.tp_size for e in self.engines)
        port = self.master_port or free_port(self.master_address)
        offsets = itertools.accumulate([1] + [e.tp_size for e in self.engines[:-1]])
        calls = [self._poster(engine, "/init_weights_update_group", {
            "master_address": self.master_address, "master_port": port,
            "rank_offset": offset, "world_size": world_size, "group_name": self.group_name,
            "backend": self.backend,
        }) for engine, offset in zip(self.engines, offsets, strict=True)]
        joined = _start(lambda: init_weights_group(
            master_address=self.master_address, master_port=port, rank=0,
            world_size=world_size, group_name=self.group_name, backend=self.backend,
            timeout=self.timeout))
        # Fails fast when any side fails; the joins still waiting give up after `timeout`.
        self._group = _result_all([joined, *(_start(call) for call in calls)])[0]

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
             weight_version: str | None = None, flush_cache: bool = True) -> None:
        """Send every (name, tensor) to every engine, e.g. `model.named_parameters()`."""
        group = self._require_group()
        items = [self._item(name, tensor.detach()) for name, tensor in named_tensors]
        if not items:
            raise ValueError("nothing to push: no (name, tensor) pairs given")
        self._check_locally([item.spec for item in items])
        stage = all(e.table is not None for e in self.engines)
        buckets = self._buckets(items)
        for index, bucket in enumerate(buckets):
            last = index == len(buckets) - 1
            body: dict[str, Any] = {
                "names": [i.spec.name for i in bucket],
                "dtypes": [dtype_name(i.spec.dtype) for i in bucket],
                "shapes": [list(i.spec.shape) for i in bucket],
                "group_name": self.group_name,
                "flush_cache": flush_cache and last,
                "weight_version": weight_version if last else None,
            }
            if stage:
                body["apply"] = last
            if self.flatten:
                body["load_format"] = "flattened_bucket"
            answers = self._announce(body)
            self._broadcast(bucket, group)
            _result_all(answers)

    def announce(self, specs: list[TensorSpec], *, weight_version: str | None = None,
                 flush_cache: bool = True) -> Callable[[], None]:
        """Tell every engine to receive `specs` (checked locally first) and return at once;
        the caller then broadcasts each tensor from rank 0 on `self.group`, in order, and
        calls the returned function, which waits for the engines' answers (raising
        WeightSyncError naming a failed engine)."""
        self._require_group()
        self._check_locally(specs)
        answers = self._announce({
            "names": [s.name for s in specs], "dtypes": [dtype_name(s.dtype) for s in specs],
            "shapes": [list(s.shape) for s in specs], "group_name": self.group_name,
            "flush_cache": flush_cache, "weight_version": weight_version,
        })

        def wait_for_answers() -> None:
            _result_all(answers)

        return wait_for_answers

    @property
    def group(self) -> dist.ProcessGroup:
        return self._require_group()

    def _announce(self, body: dict[str, Any]) -> list[concurrent.futures.Future[Any]]:
        return [_start(self._poster(e, "/update_weights_from_distributed", body))
                for e in self.engines]

    def destroy(self) -> None:
        """Leave the group on every engine and here."""
        group, self._group = self._require_group(), None
        calls = [self._poster(e, "/destroy_weights_update_group", {"group_name": self.group_name})
                 for e in self.engines]
        try:
            _result_all([_start(call) for call in calls])
        finally:
            destroy_weights_group(group)

    def __enter__(self) -> WeightSync:
        if self._group is None:
            self.init()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._group is not None:
            self.destroy()

    # ---- helpers ------------------------------------------------------------------------

    def _resolve_urls(self) -> list[str]:
        if self.engine_urls is not None:
            urls = self.engine_urls
        else:
            workers = InferenceHTTPClient(self.router_url).get("/workers").get("workers", [])
            urls = [w["url"] for w in workers]
        urls = list(dict.fromkeys(u.rstrip("/") for u in urls))
        if not urls:
            raise WeightSyncError(f"no engines to sync (router {self.router_url} lists none)")
        return urls

    @staticmethod
    def _describe(url: str) -> EngineHandle:
        client = InferenceHTTPClient(url)
        try:
            tp_size = int(client.get("/get_server_info").get("tp_size") or 1)
            try:
                table = ParameterTable.from_json(client.get("/get_weights_metadata"))
            except InferenceHTTPError as exc:
                if exc.status != 404:
                    raise
                table = None
        except (InferenceHTTPError, OSError) as exc:
            raise WeightSyncError(f"engine {url}: {exc}") from None
        return EngineHandle(url, client, tp_size, table)

    def _item(self, name: str, tensor: torch.Tensor) -> _Item:
        # Send in the engines' dtype when they agree: fewer bytes, and they cast anyway.
        targets = [e.table.target(name) for e in self.engines if e.table is not None]
        dtypes = {t.dtype for t in targets if t is not None}
        dtype = dtypes.pop() if len(dtypes) == 1 and tensor.is_floating_point() else tensor.dtype
        return _Item(TensorSpec(name, dtype, tuple(tensor.shape)), tensor)

    def _check_locally(self, specs: list[TensorSpec]) -> None:
        for engine in self.engines:
            if engine.table is None:
                continue
            try:
                engine.table.check(specs)
            except ValueError as exc:
                raise WeightSyncError(f"engine {engine.url} would refuse the push: {exc}") from None

    def _buckets(self, items: list[_Item]) -> list[list[_Item]]:
        if self.flatten:  # a flattened bucket carries one dtype
            items = sorted(items, key=lambda i: str(i.spec.dtype))
        buckets: list[list[_Item]] = []
        size = 0
        for item in items:
            same_dtype = not buckets or buckets[-1][-1].spec.dtype == item.spec.dtype
            if not buckets or size + item.spec.nbytes > self.bucket_bytes or (
                    self.flatten and not same_dtype):
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += item.spec.nbytes
        return buckets

    def _broadcast(self, bucket: list[_Item], group: dist.ProcessGroup) -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        wires = [i.tensor.to(device=device, dtype=i.spec.dtype).contiguous() for i in bucket]
        if self.flatten:
            wires = [torch.cat([w.reshape(-1) for w in wires])]
        for wire in wires:
            dist.broadcast(wire, src=0, group=group)

    def _poster(self, engine: EngineHandle, path: str, body: dict[str, Any]
                ) -> Callable[[], Any]:
        def call() -> Any:
            try:
                return engine.client.post(path, body)
            except InferenceHTTPError as exc:
                raise WeightSyncError(f"engine {engine.url} refused {path}: {exc.message}"
                                      ) from None
            except OSError as exc:
                raise WeightSyncError(f"engine {engine.url} unreachable for {path}: {exc}"
                                      ) from None
        return call

    def _require_group(self) -> dist.ProcessGroup:
        if self._group is None:
            raise RuntimeError("WeightSync is not initialised: call init() or use `with`")
        return self._group


def _start(fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run `fn` on a daemon thread (one that may block on a dead peer must not block exit)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the waiting caller
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def _result_all(futures: list[concurrent.futures.Future[T]]) -> list[T]:
    """Every result; raises the first failure as soon as it happens."""
    done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    for future in futures:
        if future in done and future.exception() is not None:
            raise future.exception()
    return [f.result() for f in futures]
