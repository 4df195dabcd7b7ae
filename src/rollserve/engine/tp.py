"""Tensor parallelism in the engine: ranks 1..tp_size-1 as child processes of rank 0.

Rank 0 is the engine itself (scheduler, radix cache, sampling); every rank holds its share of
the model and a KV pool of its own KV heads over the same slots. Each step rank 0 sends the
step's `ForwardInputs` to every other rank over a pipe, and all ranks run the forward, whose
collectives (gloo on CPU, NCCL on CUDA) make rank 0's logits whole.

Lifecycle: rank 0 starts the ranks, each loads its share and says so over its pipe; any that
fails or dies first fails the start with its reason. A rank exits when its pipe closes: no
rank outlives rank 0. A rank that dies later breaks the next collective, which fails the
engine's step (and so the engine).

Within a step the ranks' collectives go through a shared-memory region (kernels/
shm_collectives.py) where the native kernels are built, else through the gloo group. Rank 0
creates the region's file and unlinks it once every rank has mapped it.

Pipes carry steps, not the group, because a rank waits between steps for as long as the
engine is idle, longer than any collective's timeout should be. They also carry weight
updates, in order with the steps: each rank joins the trainer's weight-sync group itself (at
the engine's rank_offset + its TP rank, SGLang's contract) and receives every whole tensor,
keeping its share, and installs what it received when rank 0 does, between the same two
steps. In-memory updates reach a rank as a serialized payload of its own (SGLang's one per
rank, or one rank 0 makes from its tensors): the rank opens the shared-memory (or CUDA IPC)
handles itself, so no tensor's bytes cross a pipe.

On CPU each rank gets its own cores: the cores this process may use, split evenly in rank
order (tp_size=2 on 2 cores: one each). On CUDA rank r runs on GPU base_gpu_id + r; steps
cross the pipes on the CPU and each rank moves them to its GPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from rollserve.engine.args import EngineArgs
from rollserve.engine.kv_pool import KVPool
from rollserve.engine.messages import RemoteError
from rollserve.engine.model_runner import ForwardInputs, RankForward
from rollserve.kernels import build
from rollserve.kernels.decode_attention import make_decode_attention
from rollserve.kernels.elementwise import make_fused_elementwise
from rollserve.kernels.shm_collectives import GroupBroken, SharedMemoryGroup, create_region
from rollserve.models.config import ModelConfig, load_model_config
from rollserve.models.llama import CausalLM
from rollserve.models.loader import iter_checkpoint_tensors, load_model, resolve_dtype
from rollserve.models.parallel import TensorParallel, check_divisible, head_shard
from rollserve.utils.process import (
    UNGUARDED_MAIN_EXIT,
    exit_if_importing_main,
    free_port,
    unguarded_main_message,
)
from rollserve.weights.group import init_weights_group
from rollserve.weights.ipc import deserialize_named_tensors
from rollserve.weights.specs import TensorSpec
from rollserve.weights.updater import NamedTensors, WeightUpdater

logger = logging.getLogger(__name__)

START_TIMEOUT = timedelta(minutes=5)  # joining the group; loading is not bounded by it
LOST_GRACE = 2.0  # seconds a failed step waits to see whether a rank has exited


@dataclass(slots=True, frozen=True)
class Region:
    """The collectives' shared-memory region: its file and the kernel build that reads it."""

    path: str
    dtype: torch.dtype
    isa: str


@dataclass(slots=True, frozen=True)
class RankPlan:
    """What every rank is told at start."""

    args: EngineArgs
    size: int
    port: int  # rank 0 hosts the group's TCP store here
    devices: tuple[str, ...]  # per rank
    cores: tuple[tuple[int, ...], ...] | None  # per rank (CPU); None: leave threads as they are
    region: Region | None  # None: the collectives go through gloo only


@dataclass(slots=True, frozen=True)
class Joining:
    """A rank started and joins the group now (sent to rank 0, which joins only then: a rank
    that died first fails the start at once instead of at the group's timeout)."""


@dataclass(slots=True, frozen=True)
class Loaded:
    """A rank loaded its share (sent to rank 0)."""


@dataclass(slots=True, frozen=True)
class PoolSize:
    """Rank 0's KV pool size, which every rank's pool matches (sent to the ranks)."""

    tokens: int


@dataclass(slots=True, frozen=True)
class JoinWeightsGroup:
    """Join the trainer's group at `rank_offset` + this rank (rank_offset: the engine's)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str


@dataclass(slots=True, frozen=True)
class LeaveWeightsGroup:
    group_name: str  # what was received from it and not installed is dropped


@dataclass(slots=True, frozen=True)
class ReceiveWeights:
    """Take part in the trainer's broadcast of `specs`; keep them until installed."""

    specs: list[TensorSpec]
    group_name: str
    load_format: str | None


@dataclass(slots=True, frozen=True)
class ReadPayload:
    """SGLang's serialized tensors for this rank: whole tensors as shared-memory (or CUDA IPC)
    handles into the sender's memory. The rank copies them now and answers None or why it
    could not; the copies wait for EndRead. The sender may free its memory once the engine
    answers, so rank 0 waits for every rank's answer first."""

    payload: str
    load_format: str | None


@dataclass(slots=True, frozen=True)
class EndRead:
    """Keep what the last ReadPayload copied until installed, or drop it (a rank could not
    read its payload, so the update fails on every rank)."""

    keep: bool


@dataclass(slots=True, frozen=True)
class InstallWeights:
    """Install everything kept, then the checkpoint at `model_path` (if any) over it."""

    model_path: str | None = None


@dataclass(slots=True, frozen=True)
class ReadWeight:
    """Send back this rank's share of checkpoint tensor `name`."""

    name: str


def plan_devices(size: int, device: torch.device) -> tuple[str, ...]:
    """Each rank's device: the CPU for all, or consecutive GPUs from rank 0's."""
    if device.type != "cuda":
        return (str(device),) * size
    first, count = device.index or 0, torch.cuda.device_count()
    if first + size > count:
        raise ValueError(f"tp_size={size} from GPU {first} needs GPUs {first}..{first + size - 1}"
                         f", but this process sees {count} (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return tuple(f"cuda:{first + r}" for r in range(size))


def plan_cores(size: int, device: torch.device) -> tuple[tuple[int, ...], ...] | None:
    """The cores of each rank on CPU: this process's cores split evenly, in order."""
    if device.type != "cpu":
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < size:
        raise ValueError(f"tp_size={size} needs a CPU core per rank, but this process may use "
                         f"{len(cores)} ({', '.join(map(str, cores))})")
    per_rank = len(cores) // size
    return tuple(tuple(cores[r * per_rank:(r + 1) * per_rank]) for r in range(size))


def use_cores(cores: tuple[int, ...]) -> None:
    """Pin the calling thread (and the OpenMP team it starts later) to `cores`."""
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


class TPRanks:
    """Rank 0's handle on ranks 1..size-1: started here, fed every step, stopped with it."""

    def __init__(self, args: EngineArgs, device: torch.device) -> None:
        config = load_model_config(args.model_path)
        check_divisible(config, args.tp_size)
        exit_if_importing_main()
        devices, cores = plan_devices(args.tp_size, device), plan_cores(args.tp_size, device)
        region, shm = _shared_memory(args, device, resolve_dtype(args.dtype, config, device))
        self.plan = RankPlan(args, args.tp_size, free_port(), devices, cores, region)
        context = multiprocessing.get_context("spawn")  # a forked torch is unsafe
        self._shm = shm
        self._send_lock = threading.Lock()  # steps (engine thread) and updates (callers)
        self._stopping = threading.Event()
        self._lost = threading.Event()  # set by the watcher, with _lost_reason, if a rank exits
        self._lost_reason: str | None = None
        self._conns: list[Connection] = []
        self._processes = []
        try:
            for rank in range(1, self.plan.size):
                conn, child = context.Pipe()
                process = context.Process(target=_rank_main, args=(self.plan, rank, child),
                                          name=f"rollserve-tp-rank-{rank}", daemon=True)
                process.start()
                child.close()  # the child's end lives in the child: its exit is our EOF
                self._conns.append(conn)
                self._processes.append(process)
            if self.plan.cores is not None:
                use_cores(self.plan.cores[0])
            self._hear_from_all()  # Joining: each rank has mapped the region
            self._unlink_region()
            self.tp = TensorParallel(0, self.plan.size, _join(self.plan, 0), shm)
        except BaseException:
            self.stop()
            raise

    def wait_loaded(self) -> None:
        """Block until every rank has loaded its share; raises with the reason of one that
        failed or died."""
        self._hear_from_all()

    def _hear_from_all(self) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            message = self._receive(rank, conn)
            if isinstance(message, RemoteError):
                self.stop()
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start") \
                    from message.reraisable()

    def start_pools(self, tokens: int) -> None:
        for conn in self._conns:
            conn.send_bytes(pickle.dumps(PoolSize(tokens)))

    def send(self, message: object) -> None:
        """To every other rank, in order with everything sent before: a step's
        ForwardInputs (each rank runs it too) or a weight-update message. A rank that is gone
        fails the call."""
        self._send_each([pickle.dumps(message)] * len(self._conns))

    def _send_each(self, payloads: list[bytes]) -> None:
        """payloads[i] to rank i + 1, all of them before anything else is sent."""
        with self._send_lock:
            for rank, (conn, payload) in enumerate(zip(self._conns, payloads, strict=True),
                                                   start=1):
                try:
                    conn.send_bytes(payload)
                except OSError:
                    raise RuntimeError(f"tensor-parallel rank {rank} has exited "
                                       f"(code {self._processes[rank - 1].exitcode})") from None

    def _answers(self) -> list[object]:
        """One answer from each other rank, in rank order. Engine thread only: the ranks
        answer in the order they were asked, so one thread reads every answer."""
        answers = []
        for rank, conn in enumerate(self._conns, start=1):
            try:
                answers.append(pickle.loads(conn.recv_bytes()))
            except (EOFError, OSError):
                raise RuntimeError(self.lost() or f"tensor-parallel rank {rank} has exited"
                                   ) from None
        return answers

    def read_payloads(self, payloads: list[str], load_format: str | None) -> None:
        """Rank r reads payloads[r - 1] and keeps what it copied until InstallWeights. If one
        cannot, every rank drops its copy and this raises ValueError naming that rank.
        Engine thread only."""
        self._send_each([pickle.dumps(ReadPayload(p, load_format)) for p in payloads])
        failures = [(rank, why) for rank, why in enumerate(self._answers(), start=1) if why]
        self.send(EndRead(keep=not failures))
        if failures:
            rank, why = failures[0]
            raise ValueError(f"tensor-parallel rank {rank} could not read its serialized "
                             f"tensors: {why}")

    def send_step(self, inputs: ForwardInputs) -> None:
        """A step's inputs, on the CPU (each rank moves them to its own device)."""
        self.send(inputs.to(torch.device("cpu")))

    def gather(self, name: str, share: torch.Tensor, dim: int) -> torch.Tensor:
        """Checkpoint tensor `name` whole: rank 0's `share` and every other rank's, joined
        along `dim`. Engine thread only (the ranks answer in order)."""
        self.send(ReadWeight(name))
        shares = [share] + [other.to(share.device) for other in self._answers()]
        return torch.cat(shares, dim=dim)

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call `on_lost(reason)` (on a thread of its own) if a rank exits before `stop`: an
        idle engine would otherwise only notice at its next step.

        Invariant: this thread alone reaps a rank that exits while the engine runs (two
        threads waiting on one child race: the loser sees no exit code), and it records the
        reason before aborting the collectives, so a step that fails because of the lost
        rank finds the reason in `lost()`."""
        ranks = {p.sentinel: rank for rank, p in enumerate(self._processes, start=1)}

        def wait() -> None:
            first = multiprocessing.connection.wait(list(ranks))[0]
            if self._stopping.is_set():
                return
            process = self._processes[ranks[first] - 1]
            process.join()  # it has exited: returns at once, with its code
            self._lost_reason = (f"tensor-parallel rank {ranks[first]} exited with code "
                                 f"{process.exitcode}")
            self._lost.set()
            self._abort_collectives()  # ranks waiting for the lost one give up
            on_lost(self._lost_reason)

        threading.Thread(target=wait, name="rollserve-tp-watch", daemon=True).start()

    def lost(self) -> str | None:
        """Why the group is broken (a rank has exited), or None while every rank runs; for a
        failed step. Reaps nothing: when a rank has exited, waits for the watcher's reason.
        Gives a dying rank LOST_GRACE seconds to show as exited (its pipe to rank 0 may close
        before its sentinel does)."""
        sentinels = [p.sentinel for p in self._processes]
        if not (self._lost.is_set() or multiprocessing.connection.wait(sentinels, LOST_GRACE)):
            return None
        self._lost.wait(timeout=10)
        return self._lost_reason or "a tensor-parallel rank exited"

    def stop(self) -> None:
        """Close every pipe (each rank exits at its EOF, or gives up a collective it waits
        in) and wait for the ranks."""
        self._stopping.set()
        self._abort_collectives()
        self._unlink_region()
        for conn in self._conns:
            conn.close()
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()

    def _abort_collectives(self) -> None:
        if self._shm is not None:
            self._shm.abort()

    def _unlink_region(self) -> None:
        if self.plan.region is not None:
            Path(self.plan.region.path).unlink(missing_ok=True)

    def _receive(self, rank: int, conn: Connection) -> object:
        try:
            return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            process = self._processes[rank - 1]
            process.join(timeout=5)
            self.stop()
            if process.exitcode == UNGUARDED_MAIN_EXIT:
                raise RuntimeError(unguarded_main_message("the tp_size > 1 Engine")) from None
            raise RuntimeError(f"tensor-parallel rank {rank} exited with code "
                               f"{process.exitcode} while starting (its log is above)") from None


def _shared_memory(args: EngineArgs, device: torch.device, dtype: torch.dtype
                   ) -> tuple[Region | None, SharedMemoryGroup | None]:
    """Rank 0's shared-memory region and its end of it, or (None, None) where the
    collectives go through gloo: native kernels off or unavailable here."""
    isa = None if args.disable_native_kernels else build.native_isa(device, dtype)
    if isa is None:
        return None, None
    path = create_region(args.tp_size)
    try:
        shm = SharedMemoryGroup(path, 0, args.tp_size, dtype, isa, os.getpid())
        return Region(path, dtype, isa), shm
    except build.KernelBuildError as exc:
        Path(path).unlink()
        logger.warning("shared-memory collectives unavailable, the ranks use gloo: %s", exc)
        return None, None


def _map_region(plan: RankPlan, rank: int) -> SharedMemoryGroup | None:
    """Rank `rank`'s end of rank 0's region (its parent is rank 0)."""
    region = plan.region
    if region is None:
        return None
    return SharedMemoryGroup(region.path, rank, plan.size, region.dtype, region.isa,
                             os.getppid())


def _join(plan: RankPlan, rank: int) -> torch.distributed.ProcessGroup:
    backend = "nccl" if plan.devices[rank].startswith("cuda") else "gloo"
    return init_weights_group(master_address="127.0.0.1", master_port=plan.port, rank=rank,
                              world_size=plan.size, group_name=f"tp-{plan.port}",
                              backend=backend, timeout=START_TIMEOUT)


def load_share(args: EngineArgs, tp: TensorParallel, device: torch.device
               ) -> tuple[CausalLM, ModelConfig]:
    """Rank `tp.rank`'s share of the model, with its fused elementwise kernels."""
    config = load_model_config(args.model_path)
    dtype = resolve_dtype(args.dtype, config, device)
    context_len = args.context_length or config.max_position_embeddings
    model = load_model(args.model_path, dtype, device, context_len, tp)
    if not args.disable_native_kernels:
        model.use_fused_elementwise(make_fused_elementwise(device, dtype))
    return model, config


def _serve_rank(conn: Connection, forward: RankForward, updater: WeightUpdater,
                tp: TensorParallel) -> None:
    """Run what rank 0 sends, in order, until the pipe closes."""
    model, device = forward.model, forward.pool.device
    read: NamedTensors = []  # the last ReadPayload's copies, until EndRead
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # rank 0 stopped or died: never outlive it
        match message:
            case ForwardInputs():
                forward(message.to(device))
            case JoinWeightsGroup(address, port, offset, world, group, backend):
                updater.init_group(address, port, offset + tp.rank, world, group, backend)
            case LeaveWeightsGroup(group):
                updater.destroy_group(group)
            case ReceiveWeights(specs, group, load_format):
                updater.stage(updater.receive(specs, group, load_format))
            case ReadPayload(payload, load_format):
                read, why = _read_payload(updater, payload, load_format)
                conn.send_bytes(pickle.dumps(why))
            case EndRead(keep):
                if keep:
                    updater.stage(read)
                read = []
            case InstallWeights(model_path):
                if model_path is not None:
                    updater.stage(list(iter_checkpoint_tensors(model_path)))
                updater.install(updater.prepare(updater.take_staged([]), owned=True))
                updater.pack_some(None)
            case ReadWeight(name):
                share = model.checkpoint_weight(name).clone()  # a view would pickle its base
                conn.send_bytes(pickle.dumps(share.cpu()))


def _read_payload(updater: WeightUpdater, payload: str, load_format: str | None
                  ) -> tuple[NamedTensors, str | None]:
    """This rank's own copy of a payload's tensors (they point into the sender's memory), or
    why it could not read them: a bad payload fails the update, not the rank."""
    try:
        tensors = deserialize_named_tensors(payload, load_format)
        updater.check_tensors(tensors)
        return updater.prepare(tensors, owned=False), None
    except Exception as exc:
        return [], f"{type(exc).__name__}: {exc}"


def rank_forward(model: CausalLM, config: ModelConfig, tp: TensorParallel, tokens: int,
                 native: bool) -> RankForward:
    """The forward of one rank: its pool holds `tokens` slots of its own KV heads."""
    heads = head_shard(config, tp)
    param = next(model.parameters())
    pool = KVPool(config, tokens, param.dtype, param.device, heads.num_kv_heads)
    kernel = make_decode_attention(param.device, param.dtype, config.head_dim,
                                   heads.num_heads // heads.num_kv_heads) if native else None
    return RankForward(model, pool, kernel)


def _rank_main(plan: RankPlan, rank: int, conn: Connection) -> None:
    """A rank's process: join, load, then run every step rank 0 sends until its pipe
    closes."""
    logging.basicConfig(level=logging.INFO)
    if plan.cores is not None:
        use_cores(plan.cores[rank])
    device = torch.device(plan.devices[rank])
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        shm = _map_region(plan, rank)
        conn.send_bytes(pickle.dumps(Joining()))
        tp = TensorParallel(rank, plan.size, _join(plan, rank), shm)
        model, config = load_share(plan.args, tp, device)
        conn.send_bytes(pickle.dumps(Loaded()))
        tokens = pickle.loads(conn.recv_bytes()).tokens
        forward = rank_forward(model, config, tp, tokens, not plan.args.disable_native_kernels)
    except (EOFError, OSError):
        return  # rank 0 is gone
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(RemoteError.capture(exc)))
        return
    try:
        _serve_rank(conn, forward, WeightUpdater(model, device), tp)
    except GroupBroken:
        logger.info("tensor-parallel rank %d: the group broke (a rank exited); exiting", rank)
