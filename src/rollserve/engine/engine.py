"""`Engine`: the in-process API. Owns the model, KV pool, cache and scheduler, and runs the
scheduler loop on one background thread; callers submit from any thread or event loop."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoTokenizer

from rollserve.engine.api import EngineAPI, OnOutput, deliver
from rollserve.engine.args import EngineArgs
from rollserve.engine.cpu_memory import keep_freed_memory
from rollserve.engine.detokenizer import IncrementalDetokenizer
from rollserve.engine.kv_pool import ReqToTokenTable, pool_size_from_memory
from rollserve.engine.latency import Histogram
from rollserve.engine.model_runner import ModelRunner
from rollserve.engine.output import TokenTexts, build_output
from rollserve.engine.radix_cache import RadixCache
from rollserve.engine.request import Req
from rollserve.engine.scheduler import Scheduler, SchedulerConfig
from rollserve.engine.tp import (
    InstallWeights,
    JoinWeightsGroup,
    LeaveWeightsGroup,
    ReceiveWeights,
    TPRanks,
    rank_forward,
)
from rollserve.engine.validation import GenerateInput, RequestLimits
from rollserve.kernels.amx_linear import make_amx_linear
from rollserve.kernels.build import why_not_native
from rollserve.kernels.decode_layers import make_decode_layers
from rollserve.kernels.elementwise import make_fused_elementwise
from rollserve.kernels.sampling import make_native_sampling
from rollserve.models.catalog import DEFAULT_MODEL, resolve_model
from rollserve.models.config import ModelConfig, load_model_config
from rollserve.models.loader import load_model, resolve_device, resolve_dtype
from rollserve.models.parallel import SINGLE
from rollserve.utils.dtypes import dtype_name
from rollserve.weights.ipc import (
    check_payload_count,
    deserialize_named_tensors,
    serialize_named_tensors,
)
from rollserve.weights.specs import parse_specs
from rollserve.weights.updater import DEFAULT_GROUP, NamedTensors, WeightUpdater

logger = logging.getLogger(__name__)

T = TypeVar("T")
PACKS_PER_STEP = 8  # prepacked forms made per step after an update while requests run


class Engine(EngineAPI):
    def __init__(self, model_path: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        """`kwargs`: EngineArgs fields, or `args=EngineArgs(...)`; `on_fatal(reason)`, called if
        the engine dies (a lost tensor-parallel rank); and `after_pass`, called on
        the engine thread after every pass of its loop (commands, then a step) and once when
        it stops, for a caller that ships each step's outputs together (`EngineProcess`)."""
        self._after_pass: Callable[[], None] = kwargs.pop("after_pass", None) or (lambda: None)
        # Called on the engine thread when the engine dies (a tensor-parallel rank is lost),
        # after the requests in flight got their abort and the last pass shipped them.
        self._on_fatal: Callable[[str], None] = kwargs.pop("on_fatal", None) or (lambda _: None)
        self._fatal: str | None = None  # why the engine died, if it did
        self._admit_lock = threading.Lock()
        args = kwargs.pop("args", None) or EngineArgs(model_path=model_path, **kwargs)
        args.validate()
        self.args = args
        self.device = resolve_device(args.device, args.base_gpu_id)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
        self._token_texts = TokenTexts(self.tokenizer)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # Weight installs waiting for the engine to drain (engine thread only).
        self._pending_installs: list[tuple[Callable[[], None], concurrent.futures.Future]] = []
        # One update at a time: receives must follow the trainer's broadcast order.
        self._update_lock = threading.Lock()
        self._stopped = threading.Event()
        built: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(built,), name="rollserve-engine",
                                        daemon=True)
        self._thread.start()
        error = built.exception()  # waits for the build
        if error is not None:
            self._thread.join()  # the thread ends with a failed build: none is left behind
            raise error

    def _build_model(self) -> None:
        args = self.args
        self.model_config = config = load_model_config(args.model_path)
        self.dtype = resolve_dtype(args.dtype, config, self.device)
        self.context_len = args.context_length or config.max_position_embeddings
        self.tp_ranks = TPRanks(args, self.device) if args.tp_size > 1 else None
        try:
            self._build_share(args, config)
        except BaseException:
            if self.tp_ranks is not None:
                self.tp_ranks.stop()
            raise

    def _build_share(self, args: EngineArgs, config: ModelConfig) -> None:
        """This rank's model and KV pool, and (rank 0's alone) the scheduler."""
        tp = SINGLE if self.tp_ranks is None else self.tp_ranks.tp
        self.model = load_model(args.model_path, self.dtype, self.device, self.context_len, tp)
        fraction = args.mem_fraction_static or _default_fraction(self.device)
        pool_size = args.max_total_tokens or pool_size_from_memory(
            config, self.dtype, self.device, fraction
        )
        if self.tp_ranks is not None:
            self.tp_ranks.wait_loaded()
            self.tp_ranks.start_pools(pool_size)
        native = not args.disable_native_kernels
        forward = rank_forward(self.model, config, tp, pool_size, native)
        self.pool = forward.pool
        table = ReqToTokenTable(
            args.max_running_requests, min(self.context_len, pool_size) + 1, self.device
        )
        self.cache = RadixCache(self.pool, disabled=args.disable_radix_cache)
        self.limits = RequestLimits(config.vocab_size, self.context_len, pool_size)
        self.eos_ids = _eos_ids(Path(args.model_path), config.eos_token_id, self.tokenizer)
        generator = torch.Generator(device=self.device).manual_seed(args.random_seed)
        fused = make_fused_elementwise(self.device, self.dtype) if native else None
        amx = make_amx_linear(self.device, self.dtype) if native else None
        native_sampling = make_native_sampling(self.device) if native else None
        self.model.use_fused_elementwise(fused)
        self.model.use_amx_linear(amx)
        decode_layers = None
        if native and tp.size == 1:
            decode_layers = make_decode_layers(self.device, self.dtype, self.model.layer_shape())
        self.model.use_decode_layers(decode_layers)
        send = None
        if self.tp_ranks is not None:
            send = self.tp_ranks.send_step
            self.tp_ranks.watch(lambda reason: self._commands.put(lambda: self._die(reason)))
        runner = ModelRunner(forward, table, send)
        self.weights = WeightUpdater(self.model, self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_running_requests, args.chunked_prefill_size,
                            args.schedule_policy, self.context_len),
            runner, self.pool, table, self.cache, self.eos_ids, generator, native_sampling,
        )
        kernels = {"decode attention": forward.decode_kernel,
                   "prefill attention": forward.extend_kernel, "fused elementwise": fused,
                   "sampling": native_sampling, "AMX linear": amx,
                   "decode layers": decode_layers}
        logger.info(
            "loaded %s (%s) dtype=%s device=%s tp_size=%d; KV pool: %d tokens; native CPU "
            "kernels: %s", args.model_path, config.architecture, dtype_name(self.dtype),
            self.device, tp.size, pool_size, self._kernels_in_use(kernels),
        )

    def _kernels_in_use(self, kernels: dict[str, Any]) -> str:
        """The kernels built and the ISA they run, e.g. "decode attention, sampling (avx2
        build)", or "none" and why."""
        built = {name: kernel for name, kernel in kernels.items() if kernel is not None}
        if not built:
            return f"none ({self._why_no_kernels()})"
        isas = ", ".join(sorted({kernel.isa for kernel in built.values()}))
        return f"{', '.join(built)} ({isas} build)"

    def _why_no_kernels(self) -> str:
        if self.args.disable_native_kernels:
            return "disable_native_kernels is set"
        return why_not_native(self.device, self.dtype) or "none could be built (see above)"

    # ---- public API ---------------------------------------------------------------------

    def submit(self, inputs: list[GenerateInput], on_output: OnOutput, stream: bool) -> None:
        # on_output runs on the engine thread
        reqs = [self._make_req(i, item, on_output, stream) for i, item in enumerate(inputs)]
        for req, item in zip(reqs, inputs, strict=True):
            if item.leader_index is not None:
                req.leader = reqs[item.leader_index]
        with self._admit_lock:  # either queued before the loop's last drain, or refused
            if self._stopped.is_set():
                raise RuntimeError(f"the engine stopped: {self._fatal}" if self._fatal
                                   else "the engine is shut down")
            self._run_on_loop(lambda: [self.scheduler.add(r) for r in reqs])

    def abort(self, rid: str) -> None:
        self._run_on_loop(lambda: self.scheduler.abort(rid))

    def abort_all(self, message: str = "aborted by request") -> None:
        self._run_on_loop(lambda: self.scheduler.abort_all(message))

    def flush_cache(self) -> int:
        return self._call(self.scheduler.flush_cache)

    def latency_histograms(self) -> dict[str, Histogram]:
        stats = self.scheduler.stats
        return self._call(lambda: {
            "time_to_first_token_seconds": copy.deepcopy(stats.time_to_first_token),
            "inter_token_latency_seconds": copy.deepcopy(stats.inter_token_latency),
        })

    def stats(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            s = self.scheduler.stats
            return {
                "num_running_reqs": len(self.scheduler.running),
                "num_waiting_reqs": len(self.scheduler.waiting),
                "kv_pool_size": self.pool.size,
                "kv_used_tokens": self.pool.num_used,
                "cache_tokens": self.cache.total_size,
                "evictable_tokens": self.cache.evictable_size,
                "steps": s.steps, "prefill_steps": s.prefill_steps,
                "prefill_step_seconds": s.prefill_step_seconds,
                "decode_step_seconds": s.decode_step_seconds, "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens, "generated_tokens": s.generated_tokens,
                "retracted": s.retracted, "max_running": s.max_running,
                "requests_finished": s.requests_finished,
                "unpacked_weights": len(self.weights.unpacked),
                # updates received and waiting for the requests under way to finish
                "weight_updates_waiting": len(self._pending_installs),
            }
        return self._call(read)

    # ---- weight updates (EngineAPI states the contract) ----------------------------------

    @property
    def weight_version(self) -> str:
        return self.scheduler.weight_version

    def weights_metadata(self) -> dict[str, Any]:
        return self.weights.table.to_json()

    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = DEFAULT_GROUP, backend: str = "gloo",
    ) -> None:
        # Every TP rank joins (rank_offset + its rank): check first, so none waits alone.
        self.weights.check_join(rank_offset, world_size, group_name, backend, self.args.tp_size)
        self._tell_ranks(JoinWeightsGroup(master_address, master_port, rank_offset, world_size,
                                          group_name, backend))
        self.weights.init_group(master_address, master_port, rank_offset, world_size,
                                group_name, backend)

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP) -> None:
        with self._update_lock:
            self.weights.destroy_group(group_name)
            self._tell_ranks(LeaveWeightsGroup(group_name))

    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]],
        group_name: str = DEFAULT_GROUP, flush_cache: bool = True,
        weight_version: str | None = None, load_format: str | None = None,
        abort_all_requests: bool = False, apply: bool = True,
    ) -> str:
        specs = parse_specs(names, dtypes, shapes)
        with self._update_lock:
            self.weights.check(specs, group_name, load_format)
            self._tell_ranks(ReceiveWeights(specs, group_name, load_format))
            tensors = self.weights.receive(specs, group_name, load_format)
            return self._apply(tensors, True, apply, flush_cache, weight_version,
                               abort_all_requests)

    def update_weights_from_tensor(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], flush_cache: bool = True,
        weight_version: str | None = None, abort_all_requests: bool = False,
        apply: bool = True,
    ) -> str:
        tensors = list(named_tensors)
        self.weights.check_tensors(tensors)
        return self._update_in_memory(tensors, [], None, flush_cache, weight_version,
                                      abort_all_requests, apply)

    def update_weights_from_serialized(
        self, payload: str | list[str], load_format: str | None = None,
        flush_cache: bool = True, weight_version: str | None = None,
        abort_all_requests: bool = False, apply: bool = True,
    ) -> str:
        payloads = [payload] if isinstance(payload, str) else list(payload)
        check_payload_count(payloads, self.args.tp_size)
        tensors = deserialize_named_tensors(payloads[0], load_format)
        self.weights.check_tensors(tensors)
        return self._update_in_memory(tensors, payloads[1:], load_format, flush_cache,
                                      weight_version, abort_all_requests, apply)

    def _update_in_memory(self, tensors: NamedTensors, others: list[str],
                          load_format: str | None, flush_cache: bool,
                          weight_version: str | None, abort_all_requests: bool,
                          apply: bool) -> str:
        """Install checked `tensors` (they belong to the sender: copied). The other TP ranks
        read them too: rank r from others[r - 1] (SGLang's payload per rank) or, without
        those, from payloads of `tensors` made here, one per rank (a handle opens once)."""
        with self._update_lock:
            if self.tp_ranks is not None:
                self._read_on_ranks(self.tp_ranks, tensors, others, load_format)
            return self._apply(tensors, False, apply, flush_cache, weight_version,
                               abort_all_requests)

    def _read_on_ranks(self, ranks: TPRanks, tensors: NamedTensors, others: list[str],
                       load_format: str | None) -> None:
        shared = [] if others else [(n, t.cpu()) for n, t in tensors]  # kept until read
        if shared:
            others = [serialize_named_tensors(shared) for _ in range(self.args.tp_size - 1)]
            load_format = None
        self._call(lambda: ranks.read_payloads(others, load_format))

    def update_weights_from_disk(
        self, model_path: str, flush_cache: bool = True, weight_version: str | None = None,
        abort_all_requests: bool = False,
    ) -> str:
        with self._update_lock:
            path = resolve_model(model_path)
            tensors = self.weights.read_checkpoint(path)
            return self._apply(tensors, False, True, flush_cache, weight_version,
                               abort_all_requests, path)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        return self._call(lambda: self.weights.read(name, truncate_size, self._whole))

    def _whole(self, name: str, share: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor `name` whole, from this rank's share and the other ranks'."""
        source = self.model.slots[name].source
        if self.tp_ranks is None or source is None:
            return share
        return self.tp_ranks.gather(name, share, source.dim)

    def _tell_ranks(self, message: object) -> None:
        """A weight-update step for the other TP ranks, in order with the engine's steps."""
        if self.tp_ranks is not None:
            self.tp_ranks.send(message)

    def pause_generation(self, mode: str = "abort") -> None:
        self._call(lambda: self.scheduler.pause(mode))

    def continue_generation(self) -> None:
        self._call(self.scheduler.resume)

    def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self.abort_all("engine shut down")
        self._stopped.set()
        self._commands.put(lambda: None)  # wake the loop
        self._thread.join(timeout=30)

    # ---- engine thread ------------------------------------------------------------------

    def _make_req(
        self, index: int, item: GenerateInput, on_output: OnOutput, stream: bool
    ) -> Req:
        texts = self._token_texts if item.text_in_logprobs else None
        interval = self.args.stream_interval

        def emit(req: Req) -> None:
            produced = len(req.output_ids)
            if req.finished or (stream and (produced == 1 or produced % interval == 0)):
                deliver(on_output, index, build_output(req, texts), req.finished)

        seed = item.sampling.sampling_seed
        req = Req(
            rid=item.rid, input_ids=item.input_ids, sampling=item.sampling,
            detokenizer=IncrementalDetokenizer.for_prompt(
                self.tokenizer, item.input_ids, item.sampling.skip_special_tokens
            ),
            on_output=emit, logprob=item.logprob, weight_version=self.scheduler.weight_version,
            seed_generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        )
        if item.logprob is not None and item.logprob.start_len == 0:
            req.input_logprobs.append((None, item.input_ids[0]))
            req.input_top_logprobs.append(None)
        return req

    def _apply(self, weights: NamedTensors, owned: bool, apply: bool, flush_cache: bool,
               weight_version: str | None, abort_all_requests: bool,
               checkpoint: str | None = None) -> str:
        """`owned`: nobody else holds `weights`, so those already in the model's dtype are
        adopted without a copy. `checkpoint`: where `weights` were read from (the other TP
        ranks read their shares there)."""
        weights = self._call(lambda: self.weights.prepare(weights, owned))
        if not apply:
            self.weights.stage(weights)
            return f"staged {len(weights)} tensors; they take effect with the next update"
        weights = self.weights.take_staged(weights)
        if abort_all_requests:
            self.abort_all("aborted for a weight update")

        def install() -> None:
            self.weights.install(weights)
            self._tell_ranks(InstallWeights(checkpoint))
            self.scheduler.weights_changed(weight_version)
            if flush_cache:
                self.scheduler.flush_cache()

        self._when_drained(install)
        return f"updated {len(weights)} tensors; weight_version={self.weight_version}"

    def _when_drained(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread once no started request is unfinished (no new one
        starts meanwhile), or at once while paused; returns when it has run."""
        if self._stopped.is_set():
            raise RuntimeError("the engine is shut down")
        future: concurrent.futures.Future[None] = concurrent.futures.Future()

        def enqueue() -> None:
            self._pending_installs.append((fn, future))
            self.scheduler.hold_admission = True

        self._commands.put(enqueue)
        self._wait(future)

    def _run_on_loop(self, fn: Callable[[], object]) -> None:
        self._commands.put(fn)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        self._commands.put(run)
        return self._wait(future)

    def _wait(self, future: concurrent.futures.Future[T]) -> T:
        """The result of a command given to the engine thread; raises instead of waiting
        forever when that thread has ended (shutdown) without running it."""
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if not self._thread.is_alive() and not future.done():
                    raise RuntimeError("the engine is shut down") from None

    def _run(self, built: concurrent.futures.Future[None]) -> None:
        """The engine thread: builds the model, then runs the loop.

        Invariant: the model's tensor work runs on this thread only (weight casts included).
        OpenMP keeps a team of workers per thread that ever ran a parallel region, and once
        the process has more team threads than cores, libgomp stops spinning between regions:
        every kernel then pays a sleep and wake-up, ~20-50 us, hundreds of times per step
        (BENCHMARKS.md, "Decode steps with one OpenMP team vs two"). Loading on the caller's
        thread left its team behind for the life of the process."""
        try:
            if self.device.type == "cuda":  # the GPU of this thread's kernels (and NCCL's)
                torch.cuda.set_device(self.device)
            self._build_model()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            install_ready = bool(self._pending_installs) and self.scheduler.drained
            self._drain_commands(block=not (self.scheduler.has_work or install_ready
                                            or self.weights.unpacked))
            if self._stopped.is_set():
                break
            self._run_pending_installs()
            if self.weights.unpacked:  # idle: all at once; busy: a few per step
                self.weights.pack_some(PACKS_PER_STEP if self.scheduler.has_work else None)
            try:
                self.scheduler.step()
            except Exception:
                lost = self.tp_ranks.lost() if self.tp_ranks is not None else None
                if lost is not None:  # the engine cannot step without it
                    self._die(lost)
                    break
                # Fail the requests in flight, never the engine: later requests still run.
                logger.exception("engine step failed; aborting the requests in flight")
                self.scheduler.abort_all("internal error in the engine step (see server log)")
            self._after_pass()
        with self._admit_lock:  # shutdown's abort_all, and requests that came meanwhile
            self._drain_commands(block=False)
        self.scheduler.abort_all("the engine stopped: " + self._fatal if self._fatal
                                 else "engine shut down")
        self._after_pass()  # those outputs go out
        for _, future in self._pending_installs:
            future.set_exception(RuntimeError("engine shut down before the update applied"))
        if self.tp_ranks is not None:
            self.tp_ranks.stop()
        if self._fatal is not None:
            self._on_fatal(self._fatal)

    def _die(self, reason: str) -> None:
        if self._fatal is not None:  # the step and the rank watcher may both report it
            return
        logger.error("%s: the engine stops", reason)
        self._fatal = reason
        self._stopped.set()
        self.scheduler.abort_all(f"the engine stopped: {reason}")

    def _run_pending_installs(self) -> None:
        if not (self._pending_installs and self.scheduler.drained):
            return
        pending, self._pending_installs = self._pending_installs, []
        self.scheduler.hold_admission = False
        for fn, future in pending:
            try:
                future.set_result(fn())
            except Exception as exc:
                logger.exception("installing new weights failed")
                future.set_exception(exc)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return


def _default_fraction(device: torch.device) -> float:
    # On CPU the pool shares RAM with everything else on the machine: take less of it.
    return 0.85 if device.type == "cuda" else 0.3


def _eos_ids(model_path: Path, config_eos: tuple[int, ...], tokenizer: Any) -> tuple[int, ...]:
    ids = set(config_eos)
    generation_config = model_path / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))

