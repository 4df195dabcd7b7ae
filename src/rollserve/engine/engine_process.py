"""`EngineProcess`: an `Engine` in a child process, driven over a pipe.

The HTTP server runs its engine this way, as SGLang runs its scheduler: the event loop and
the engine thread then never wait on one interpreter lock. A GPU engine's step is Python
launching kernels, so every event the loop streamed was time taken from the engine
(BENCHMARKS.md, "Online (HTTP) vs offline engine").

The messages are the typed ones of `engine/messages.py`. Invariants: a batch's callback is
dropped after its last finished output; when the child dies, every unfinished request still
gets its finish (an abort) and every pending call raises.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch
from transformers import AutoTokenizer

from rollserve.engine import messages as msg
from rollserve.engine.api import EngineAPI, OnOutput, deliver
from rollserve.engine.args import EngineArgs
from rollserve.engine.engine import Engine
from rollserve.engine.latency import Histogram
from rollserve.engine.messages import Output, RemoteError
from rollserve.engine.output import lost_output
from rollserve.engine.validation import GenerateInput
from rollserve.utils.process import (
    UNGUARDED_MAIN_EXIT,
    exit_if_importing_main,
    unguarded_main_message,
)
from rollserve.weights.ipc import serialize_named_tensors
from rollserve.weights.updater import DEFAULT_GROUP

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
T = TypeVar("T")


@dataclass(slots=True)
class _Batch:
    on_output: OnOutput
    inputs: list[GenerateInput]
    unfinished: set[int]
    last: dict[int, dict[str, Any]] = field(default_factory=dict)


class EngineProcess(EngineAPI):
    """The `Engine` calls the server makes, answered by an engine in a child process; the
    weight-update calls take Engine's arguments. Requests are validated and tokenized here.
    `on_output` callbacks run on this process's reader thread, as does `on_exit` if the
    child dies while this object is open: they must not wait on this object (a call to the
    child, `shutdown`), since the reader is what would deliver the answer."""

    def __init__(self, args: EngineArgs, log_level: int = logging.INFO,
                 on_exit: Callable[[], None] | None = None) -> None:
        exit_if_importing_main()
        args.validate()
        self.args = args
        context = multiprocessing.get_context("spawn")  # a forked torch is unsafe
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(args, child_conn, log_level),
                                        name="rollserve-engine", daemon=True)
        self._process.start()
        child_conn.close()  # the child's end lives in the child only: its exit is our EOF
        info = self._await_start()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
        except BaseException:
            self._process.kill()  # loaded, but unusable without its tokenizer here
            self._process.join()
            raise
        self.model_config, self.context_len = info.model_config, info.context_len
        self.limits, self.device = info.limits, torch.device(info.device)
        self._on_exit = on_exit
        self._send_lock = threading.Lock()
        # Guards _exited, and entries added to the two dicts; only the reader thread removes
        # entries (or swaps the dicts, in _fail_everything, under this lock).
        self._state_lock = threading.Lock()
        self._batches: dict[int, _Batch] = {}
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._exited: str | None = None  # why the child is gone, once it is
        self._closing = False
        self.crashed = False  # the child died without being asked to stop
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="rollserve-engine-reader",
                                        daemon=True)
        self._reader.start()

    def _await_start(self) -> msg.Ready:
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join()
            if self._process.exitcode == UNGUARDED_MAIN_EXIT:
                raise RuntimeError(unguarded_main_message("the EngineProcess")) from None
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} "
                               "while loading the model (its log is above)") from None
        if isinstance(message, msg.Failed):
            self._process.join()
            raise message.error.reraisable()
        return message

    # ---- generation ---------------------------------------------------------------------

    def submit(self, inputs: list[GenerateInput], on_output: OnOutput, stream: bool) -> None:
        batch = next(self._ids)
        with self._state_lock:
            if self._exited is not None:
                raise RuntimeError(self._exited)
            self._batches[batch] = _Batch(on_output, inputs, set(range(len(inputs))))
        try:
            self._send(msg.Submit(batch, inputs, stream))
        except RuntimeError:
            with self._state_lock:
                self._batches.pop(batch, None)
            raise

    def abort(self, rid: str) -> None:
        self._send(msg.Abort(rid), required=False)

    def abort_all(self, message: str = "aborted by request") -> None:
        self._send(msg.AbortAll(message), required=False)

    # ---- everything else, answered by the child's Engine --------------------------------

    def flush_cache(self) -> int:
        return self._call(msg.FlushCache())

    def stats(self) -> dict[str, Any]:
        return self._call(msg.Stats())

    def latency_histograms(self) -> dict[str, Histogram]:
        return self._call(msg.LatencyHistograms())

    @property
    def weight_version(self) -> str:
        return self._call(msg.WeightVersion())

    def weights_metadata(self) -> dict[str, Any]:
        return self._call(msg.WeightsMetadata())

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        return self._call(msg.GetWeightsByName(name, truncate_size))

    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = DEFAULT_GROUP, backend: str = "gloo",
    ) -> None:
        self._call(msg.InitWeightsUpdateGroup(master_address, master_port, rank_offset,
                                              world_size, group_name, backend))

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP) -> None:
        self._call(msg.DestroyWeightsUpdateGroup(group_name))

    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]],
        group_name: str = DEFAULT_GROUP, flush_cache: bool = True,
        weight_version: str | None = None, load_format: str | None = None,
        abort_all_requests: bool = False, apply: bool = True,
    ) -> str:
        return self._call(msg.UpdateWeightsFromDistributed(
            names, dtypes, shapes, group_name, flush_cache, weight_version, load_format,
            abort_all_requests, apply,
        ))

    def update_weights_from_serialized(
        self, payload: str | list[str], load_format: str | None = None,
        flush_cache: bool = True, weight_version: str | None = None,
        abort_all_requests: bool = False, apply: bool = True,
    ) -> str:
        return self._call(msg.UpdateWeightsFromSerialized(
            payload, load_format, flush_cache, weight_version, abort_all_requests, apply,
        ))

    def update_weights_from_tensor(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], flush_cache: bool = True,
        weight_version: str | None = None, abort_all_requests: bool = False,
        apply: bool = True,
    ) -> str:
        """The tensors cross as SGLang's serialized form: CPU storages move to shared
        memory, CUDA ones travel as IPC handles."""
        return self.update_weights_from_serialized(
            serialize_named_tensors(named_tensors), None, flush_cache, weight_version,
            abort_all_requests, apply,
        )

    def update_weights_from_disk(
        self, model_path: str, flush_cache: bool = True, weight_version: str | None = None,
        abort_all_requests: bool = False,
    ) -> str:
        return self._call(msg.UpdateWeightsFromDisk(model_path, flush_cache, weight_version,
                                                    abort_all_requests))

    def pause_generation(self, mode: str = "abort") -> None:
        self._call(msg.PauseGeneration(mode))

    def continue_generation(self) -> None:
        self._call(msg.ContinueGeneration())

    def shutdown(self) -> None:
        """Requests in flight finish with an abort; returns once the child has exited."""
        with self._state_lock:
            if self._closing:
                return
            self._closing = True
        self._send(msg.Shutdown(), required=False)
        self._reader.join(timeout=60)  # it ends once the child has exited and been reaped
        if self._reader.is_alive():
            logger.error("the engine process did not stop within 60 s; killing it")
            self._process.kill()
            self._reader.join()
        self._conn.close()

    # ---- the pipe -----------------------------------------------------------------------

    def _call(self, request: msg.EngineCall[T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        call_id = next(self._ids)
        with self._state_lock:
            if self._exited is not None:
                raise RuntimeError(self._exited)
            self._calls[call_id] = future
        self._send(msg.Call(call_id, request))
        return future.result()

    def _send(self, message: object, required: bool = True) -> None:
        """`required`: raise if the child is gone (an abort then has nothing left to do)."""
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # ValueError: our end is closed already
            if required:
                raise RuntimeError("the engine process has exited") from None

    def _read(self) -> None:
        """Invariant: this thread alone reaps the child (two joining threads race on
        waitpid), and whatever ends it fails everything still waiting."""
        try:
            while True:
                match self._conn.recv():
                    case msg.Outputs(items):
                        self._deliver(items)
                    case msg.Result(call_id, error, value):
                        future = self._calls.pop(call_id)
                        if error is not None:
                            future.set_exception(error.reraisable())
                        else:
                            future.set_result(value)
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading from the engine process failed; stopping it")
            self._process.kill()
        finally:
            self._process.join(timeout=30)
            self._fail_everything(f"the engine process exited (code {self._process.exitcode})")

    def _deliver(self, outputs: list[Output]) -> None:
        for batch_id, index, output, finished in outputs:
            batch = self._batches.get(batch_id)
            if batch is None:  # failed already (a submit whose send broke)
                continue
            deliver(batch.on_output, index, output, finished)
            if finished:
                batch.unfinished.discard(index)
                if not batch.unfinished:
                    del self._batches[batch_id]
            else:
                batch.last[index] = output

    def _fail_everything(self, reason: str) -> None:
        with self._state_lock:
            self._exited = reason
            batches, self._batches = self._batches, {}
            calls, self._calls = self._calls, {}
            unexpected = self.crashed = not self._closing
        if unexpected:
            logger.error("%s; failing %d requests in flight", reason,
                         sum(len(b.unfinished) for b in batches.values()))
        for batch in batches.values():
            for index in sorted(batch.unfinished):
                deliver(batch.on_output, index,
                        lost_output(batch.inputs[index], batch.last.get(index), reason), True)
        for future in calls.values():
            future.set_exception(RuntimeError(reason))
        if unexpected and self._on_exit is not None:
            self._on_exit()




# ---- the child ----------------------------------------------------------------------------

def _serve(args: EngineArgs, conn: Connection, log_level: int) -> None:
    """The child's main: build the engine, then follow the parent's messages until it says
    shutdown or goes away."""
    # Ctrl-C and a stop of the whole process group (process.py's, systemd's) reach this
    # process too; the parent decides when the engine stops, after aborting what runs. If
    # the parent dies instead, the pipe's EOF stops the engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The parent started this process as a daemon (it is terminated when the parent exits);
    # that flag matters to the parent only, but multiprocessing also refuses a daemon's own
    # children, and a tp_size > 1 engine starts its ranks from here.
    multiprocessing.current_process().daemon = False
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    outputs: list[Output] = []  # engine thread only

    def ship_outputs() -> None:
        if not outputs:
            return
        try:
            _send(conn, send_lock, msg.Outputs(outputs.copy()))
        except Exception:  # outputs that do not pickle: without them the parent would wait
            logger.exception("shipping outputs to the server failed; stopping the engine")
            os._exit(1)  # the parent sees EOF and fails every request it holds
        outputs.clear()

    send_lock = threading.Lock()
    try:
        engine = Engine(args=args, after_pass=ship_outputs, on_fatal=lambda _: os._exit(1))
    except BaseException as exc:
        _send(conn, send_lock, msg.Failed(RemoteError.capture(exc)))
        return
    _send(conn, send_lock, msg.Ready(engine.model_config, engine.context_len, engine.limits,
                                     str(engine.device)))
    try:
        _follow(engine, conn, send_lock, outputs)
    finally:
        engine.shutdown()  # aborts what still runs; its last pass ships those outputs
        conn.close()


def _follow(engine: Engine, conn: Connection, send_lock: threading.Lock,
            outputs: list[Output]) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        match message:
            case msg.Submit(batch, inputs, stream):
                _submit(engine, conn, send_lock, batch, inputs, stream, outputs)
            case msg.Abort(rid):
                engine.abort(rid)
            case msg.AbortAll(text):
                engine.abort_all(text)
            case msg.Call(call_id, request):  # may block long (an update waits for a trainer)
                threading.Thread(target=_answer, args=(engine, conn, send_lock, call_id, request),
                                 daemon=True).start()
            case msg.Shutdown():
                return


def _submit(engine: Engine, conn: Connection, send_lock: threading.Lock, batch: int,
            inputs: list[GenerateInput], stream: bool, outputs: list[Output]) -> None:
    """A submit that fails finishes its requests with an abort; the engine serves on."""
    try:
        engine.submit(inputs, _collector(outputs, batch), stream)
    except Exception as exc:
        logger.exception("submitting a request failed")
        reason = f"the engine could not take the request: {type(exc).__name__}: {exc}"
        _send(conn, send_lock, msg.Outputs([(batch, i, lost_output(item, None, reason), True)
                                            for i, item in enumerate(inputs)]))


def _collector(outputs: list[Output], batch: int) -> OnOutput:
    def collect(index: int, output: dict[str, Any], finished: bool) -> None:
        outputs.append((batch, index, output, finished))

    return collect


def _answer(engine: Engine, conn: Connection, send_lock: threading.Lock, call_id: int,
            request: msg.EngineCall) -> None:
    try:
        reply = msg.Result(call_id, None, request.run(engine))
    except Exception as exc:
        reply = msg.Result(call_id, RemoteError.capture(exc), None)
    try:
        _send(conn, send_lock, reply)
    except Exception as exc:  # a value that does not pickle: the caller must still hear
        _send(conn, send_lock, msg.Result(call_id, RemoteError.capture(RuntimeError(
            f"the answer to {type(request).__name__} could not be sent: "
            f"{type(exc).__name__}: {exc}")), None))


def _send(conn: Connection, lock: threading.Lock, message: object) -> None:
    try:
        with lock:
            conn.send(message)
    except OSError:
        pass  # the parent is gone: the receive loop sees it and stops the engine
