"""`EngineProcess`: an `Engine` in a child process, driven over a pipe.

The HTTP server runs its engine this way, as SGLang runs its scheduler: the event loop and
the engine thread then never wait on one interpreter lock. A GPU engine's step is Python
launching kernels, so every event the loop streamed was time taken from the engine
(BENCHMARKS.md, "Online (HTTP) vs offline engine").

Messages, parent to child: ("submit", batch, inputs, stream), ("abort", rid),
("abort_all", message), ("call", call_id, method, args, kwargs), ("shutdown",).
Child to parent: ("ready", EngineInfo) or ("failed", RemoteError) once, then
("outputs", [(batch, index, output, finished), ...]) after every pass of the engine loop
that produced any, and ("result", call_id, RemoteError or None, value).
Invariants: a batch's callback is dropped after its last finished output; when the child
dies, every unfinished request still gets its finish (an abort) and every pending call
raises.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
from transformers import AutoTokenizer

from rollserve.engine.api import GenerationAPI, OnOutput, deliver
from rollserve.engine.args import EngineArgs
from rollserve.engine.engine import Engine
from rollserve.engine.latency import Histogram
from rollserve.engine.output import lost_output
from rollserve.engine.validation import GenerateInput, RequestLimits
from rollserve.models.config import ModelConfig
from rollserve.weights.ipc import serialize_named_tensors

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The exit status of an engine process that was told to make an engine of its own while
# importing the parent's script (see `_exit_if_importing_main`): the parent explains it.
UNGUARDED_MAIN_EXIT = 79
Output = tuple[int, int, dict[str, Any], bool]  # batch, index, output, finished


@dataclass(slots=True, frozen=True)
class EngineInfo:
    """What the parent needs without asking: set once the model is loaded."""

    model_config: ModelConfig
    context_len: int
    limits: RequestLimits
    device: str


class RemoteTraceback(Exception):
    """Where in the engine process an error was raised: the `__cause__` of the exception
    raised here, so a logged error shows the engine's frames, not only the pipe's."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(slots=True, frozen=True)
class RemoteError:
    """An exception raised in the engine process, with its traceback as text (a pickled
    exception loses its traceback)."""

    exception: BaseException
    traceback: str

    @classmethod
    def capture(cls, exc: BaseException) -> RemoteError:
        return cls(_picklable(exc), "".join(traceback.format_exception(exc)))

    def reraisable(self) -> BaseException:
        self.exception.__cause__ = RemoteTraceback(self.traceback)
        return self.exception


@dataclass(slots=True)
class _Batch:
    on_output: OnOutput
    inputs: list[GenerateInput]
    unfinished: set[int]
    last: dict[int, dict[str, Any]] = field(default_factory=dict)


class EngineProcess(GenerationAPI):
    """The `Engine` calls the server makes, answered by an engine in a child process; the
    weight-update calls take Engine's arguments. Requests are validated and tokenized here.
    `on_output` callbacks run on this process's reader thread, as does `on_exit` if the
    child dies while this object is open: they must not wait on this object (a call to the
    child, `shutdown`), since the reader is what would deliver the answer."""

    def __init__(self, args: EngineArgs, log_level: int = logging.INFO,
                 on_exit: Callable[[], None] | None = None) -> None:
        _exit_if_importing_main()
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

    def _await_start(self) -> EngineInfo:
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._process.join()
            if self._process.exitcode == UNGUARDED_MAIN_EXIT:
                raise RuntimeError(_unguarded_main_message()) from None
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} "
                               "while loading the model (its log is above)") from None
        if kind == "failed":
            self._process.join()
            raise value.reraisable()
        return value

    # ---- generation ---------------------------------------------------------------------

    def submit(self, inputs: list[GenerateInput], on_output: OnOutput, stream: bool) -> None:
        batch = next(self._ids)
        with self._state_lock:
            if self._exited is not None:
                raise RuntimeError(self._exited)
            self._batches[batch] = _Batch(on_output, inputs, set(range(len(inputs))))
        try:
            self._send(("submit", batch, inputs, stream))
        except RuntimeError:
            with self._state_lock:
                self._batches.pop(batch, None)
            raise

    def abort(self, rid: str) -> None:
        self._send(("abort", rid), required=False)

    def abort_all(self, message: str = "aborted by request") -> None:
        self._send(("abort_all", message), required=False)

    # ---- everything else, answered by the child's Engine --------------------------------

    def flush_cache(self) -> int:
        return self._call("flush_cache")

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def latency_histograms(self) -> dict[str, Histogram]:
        return self._call("latency_histograms")

    @property
    def weight_version(self) -> str:
        return self._call("weight_version")

    def weights_metadata(self) -> dict[str, Any]:
        return self._call("weights_metadata")

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        return self._call("get_weights_by_name", name, truncate_size)

    def init_weights_update_group(self, *args: Any, **kwargs: Any) -> None:
        self._call("init_weights_update_group", *args, **kwargs)

    def destroy_weights_update_group(self, *args: Any, **kwargs: Any) -> None:
        self._call("destroy_weights_update_group", *args, **kwargs)

    def update_weights_from_distributed(self, *args: Any, **kwargs: Any) -> str:
        return self._call("update_weights_from_distributed", *args, **kwargs)

    def update_weights_from_serialized(self, payload: str, load_format: str | None = None,
                                       **update: Any) -> str:
        return self._call("update_weights_from_serialized", payload, load_format, **update)

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                   **update: Any) -> str:
        """The tensors cross as SGLang's serialized form: CPU storages move to shared
        memory, CUDA ones travel as IPC handles."""
        return self.update_weights_from_serialized(serialize_named_tensors(named_tensors),
                                                   **update)

    def update_weights_from_disk(self, *args: Any, **kwargs: Any) -> str:
        return self._call("update_weights_from_disk", *args, **kwargs)

    def pause_generation(self, mode: str = "abort") -> None:
        self._call("pause_generation", mode)

    def continue_generation(self) -> None:
        self._call("continue_generation")

    def shutdown(self) -> None:
        """Requests in flight finish with an abort; returns once the child has exited."""
        with self._state_lock:
            if self._closing:
                return
            self._closing = True
        self._send(("shutdown",), required=False)
        self._reader.join(timeout=60)  # it ends once the child has exited and been reaped
        if self._reader.is_alive():
            logger.error("the engine process did not stop within 60 s; killing it")
            self._process.kill()
            self._reader.join()
        self._conn.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- the pipe -----------------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        call_id = next(self._ids)
        with self._state_lock:
            if self._exited is not None:
                raise RuntimeError(self._exited)
            self._calls[call_id] = future
        self._send(("call", call_id, method, args, kwargs))
        return future.result()

    def _send(self, message: tuple, required: bool = True) -> None:
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
                kind, *body = self._conn.recv()
                if kind == "outputs":
                    self._deliver(body[0])
                else:  # "result"
                    call_id, error, value = body
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


# What the server runs over: its own engine process, or an in-process Engine (tests, and
# programs that embed the app).
AnyEngine = Engine | EngineProcess


# ---- the child ----------------------------------------------------------------------------

def _exit_if_importing_main() -> None:
    """A "spawn" child imports the parent's script again before it runs `_serve`. A script
    that makes its EngineProcess at top level, with no `if __name__ == "__main__":` guard,
    makes one in the child too, and multiprocessing refuses that start with a traceback about
    "bootstrapping" that names neither rollserve nor the fix. Such a child exits here, with a
    status the parent turns into an error that does. `_inheriting` is what multiprocessing's
    own check reads (`spawn._check_not_importing_main`): true only while a child re-imports
    its parent's main module, so an EngineProcess made later in a child is not affected."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(UNGUARDED_MAIN_EXIT)


def _unguarded_main_message() -> str:
    script = getattr(sys.modules["__main__"], "__file__", None) or "your script"
    return (f"the engine process stopped at once: it imports {script} again (multiprocessing's "
            "'spawn' start, which torch needs), and that made another EngineProcess there. "
            'Put the code that makes the EngineProcess under `if __name__ == "__main__":`, '
            "as multiprocessing requires of a script that starts processes")


def _serve(args: EngineArgs, conn: Connection, log_level: int) -> None:
    """The child's main: build the engine, then follow the parent's messages until it says
    shutdown or goes away."""
    # Ctrl-C and a stop of the whole process group (process.py's, systemd's) reach this
    # process too; the parent decides when the engine stops, after aborting what runs. If
    # the parent dies instead, the pipe's EOF stops the engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    outputs: list[Output] = []  # engine thread only

    def ship_outputs() -> None:
        if not outputs:
            return
        try:
            _send(conn, send_lock, ("outputs", outputs.copy()))
        except Exception:  # outputs that do not pickle: without them the parent would wait
            logger.exception("shipping outputs to the server failed; stopping the engine")
            os._exit(1)  # the parent sees EOF and fails every request it holds
        outputs.clear()

    send_lock = threading.Lock()
    try:
        engine = Engine(args=args, after_pass=ship_outputs)
    except BaseException as exc:
        _send(conn, send_lock, ("failed", RemoteError.capture(exc)))
        return
    info = EngineInfo(engine.model_config, engine.context_len, engine.limits, str(engine.device))
    _send(conn, send_lock, ("ready", info))
    try:
        _follow(engine, conn, send_lock, outputs)
    finally:
        engine.shutdown()  # aborts what still runs; its last pass ships those outputs
        conn.close()


def _follow(engine: Engine, conn: Connection, send_lock: threading.Lock,
            outputs: list[Output]) -> None:
    while True:
        try:
            kind, *body = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if kind == "submit":
            _submit(engine, conn, send_lock, *body, outputs)
        elif kind == "abort":
            engine.abort(body[0])
        elif kind == "abort_all":
            engine.abort_all(body[0])
        elif kind == "call":  # may block for long (a weight update waits for the trainer)
            threading.Thread(target=_answer, args=(engine, conn, send_lock, *body),
                             daemon=True).start()
        else:  # "shutdown"
            return


def _submit(engine: Engine, conn: Connection, send_lock: threading.Lock, batch: int,
            inputs: list[GenerateInput], stream: bool, outputs: list[Output]) -> None:
    """A submit that fails finishes its requests with an abort; the engine serves on."""
    try:
        engine.submit(inputs, _collector(outputs, batch), stream)
    except Exception as exc:
        logger.exception("submitting a request failed")
        reason = f"the engine could not take the request: {type(exc).__name__}: {exc}"
        _send(conn, send_lock, ("outputs", [(batch, i, lost_output(item, None, reason), True)
                                            for i, item in enumerate(inputs)]))


def _collector(outputs: list[Output], batch: int) -> OnOutput:
    def collect(index: int, output: dict[str, Any], finished: bool) -> None:
        outputs.append((batch, index, output, finished))

    return collect


def _answer(engine: Engine, conn: Connection, send_lock: threading.Lock, call_id: int,
            method: str, args: tuple, kwargs: dict[str, Any]) -> None:
    try:
        attribute = getattr(engine, method)
        value = attribute(*args, **kwargs) if callable(attribute) else attribute
        reply = ("result", call_id, None, value)
    except Exception as exc:
        reply = ("result", call_id, RemoteError.capture(exc), None)
    try:
        _send(conn, send_lock, reply)
    except Exception as exc:  # a value that does not pickle: the caller must still hear
        _send(conn, send_lock, ("result", call_id, RemoteError.capture(RuntimeError(
            f"{method}'s answer could not be sent: {type(exc).__name__}: {exc}")), None))


def _send(conn: Connection, lock: threading.Lock, message: tuple) -> None:
    try:
        with lock:
            conn.send(message)
    except OSError:
        pass  # the parent is gone: the receive loop sees it and stops the engine


def _picklable(exc: BaseException) -> BaseException:
    """`exc` itself when it survives the pipe (a ValueError stays a ValueError, for the
    server's 400s), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
