"""Engine-side weight updates: the weight-sync groups, receiving broadcast tensors, reading
replacement checkpoints, and installing new weights into the model.

Threading: receiving and checkpoint reading run on the caller's thread, so the engine keeps
generating on the old weights meanwhile. Everything that computes on tensors runs on the
engine thread between steps (Engine schedules it; see Engine._run for why): `prepare` casts
and copies what arrived, `install` swaps the new tensors in, all at once, without copying.
Their oneDNN-prepacked forms follow (`pack_some`): packing during the broadcast competed with
it for the CPU, and the plain matmul path gives bit-identical results meanwhile, so new
weights serve at once.

On CPU the weights an update replaces become the next update's receive buffers: the process
keeps freed memory anyway (cpu_memory.keep_freed_memory), and fresh buffers page-faulted in
(measured: the 272 MB embedding of a 0.5B model on every push) and fragmented the heap.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from rollserve.models.config import load_model_config
from rollserve.models.linear import can_pack
from rollserve.models.llama import CausalLM
from rollserve.models.loader import iter_checkpoint_tensors
from rollserve.weights.group import destroy_weights_group, init_weights_group
from rollserve.weights.specs import LM_HEAD_NAME, ParameterTable, TensorSpec

NamedTensors = list[tuple[str, torch.Tensor]]
DEFAULT_GROUP = "weight_update_group"  # SGLang's default group name
BACKENDS = ("gloo", "nccl")
FLATTENED_BUCKET = "flattened_bucket"
# Config fields that may differ between checkpoints of one architecture.
_FREE_CONFIG_FIELDS = ("torch_dtype", "eos_token_id", "bos_token_id", "max_position_embeddings")


class WeightUpdater:
    def __init__(self, model: CausalLM, device: torch.device) -> None:
        self.model = model
        self.device = device
        # Whole checkpoint shapes: a trainer sends whole tensors, whatever the engine's TP.
        specs = (TensorSpec(name, model.get_parameter(slot.param).dtype, slot.shape)
                 for name, slot in model.slots.items())
        self.table = ParameterTable.of(specs, model.config.tie_word_embeddings)
        self.groups: dict[str, dist.ProcessGroup] = {}
        # New weights: in the parameter's dtype and device, owned (the model adopts them).
        self.staged: dict[str, torch.Tensor] = {}  # received with apply=False, not yet in
        self.unpacked: dict[str, None] = {}  # installed, prepacked form not made yet (in order)
        self.spare: dict[str, torch.Tensor] = {}  # CPU: replaced weights, for receiving into

    # ---- groups -------------------------------------------------------------------------

    def init_group(self, master_address: str, master_port: int, rank_offset: int,
                   world_size: int, group_name: str, backend: str) -> None:
        """Join as rank `rank_offset` (a TP rank passes the engine's offset plus its own
        rank); blocks until every rank has joined."""
        self.check_join(rank_offset, world_size, group_name, backend)
        self.groups[group_name] = init_weights_group(
            master_address=master_address, master_port=master_port, rank=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend,
        )

    def check_join(self, rank_offset: int, world_size: int, group_name: str, backend: str,
                   ranks: int = 1) -> None:
        """Everything that can refuse a join of `ranks` consecutive ranks from
        `rank_offset`, checked before any of them joins."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("backend 'nccl' needs an engine on CUDA; use 'gloo' on CPU")
        if group_name in self.groups:
            raise ValueError(f"weights update group {group_name!r} already exists")
        if not 0 < rank_offset <= world_size - ranks:
            what = "rank_offset" if ranks == 1 else f"rank_offset (this engine's {ranks} TP ranks"\
                f" take rank_offset..rank_offset+{ranks - 1})"
            raise ValueError(f"{what} must leave rank 0 to the trainer and fit in world_size: "
                             f"got {rank_offset} of {world_size}")

    def destroy_group(self, group_name: str) -> None:
        """Leave the group; tensors staged from it and not yet applied are dropped."""
        group = self.groups.pop(group_name, None)
        if group is None:
            raise ValueError(f"no weights update group named {group_name!r}")
        self.staged.clear()
        destroy_weights_group(group)

    # ---- receiving ----------------------------------------------------------------------

    def check(self, specs: list[TensorSpec], group_name: str, load_format: str | None) -> None:
        """Everything that can refuse an update, checked before any byte is received."""
        if group_name not in self.groups:
            raise ValueError(f"no weights update group named {group_name!r}; "
                             "call /init_weights_update_group first")
        if load_format not in (None, FLATTENED_BUCKET):
            raise ValueError(f"load_format must be null or {FLATTENED_BUCKET!r}, "
                             f"got {load_format!r}")
        if load_format == FLATTENED_BUCKET and len({s.dtype for s in specs}) > 1:
            raise ValueError("a flattened_bucket update must carry a single dtype")
        self.table.check(specs)

    def receive(self, specs: list[TensorSpec], group_name: str,
                load_format: str | None) -> NamedTensors:
        """The trainer's broadcast (src rank 0) of `specs`, in order, into fresh buffers:
        one broadcast per tensor (SGLang's protocol) or one for the whole flattened bucket."""
        group = self.groups[group_name]
        if load_format == FLATTENED_BUCKET and specs:
            flat = torch.empty(sum(s.numel for s in specs),
                               dtype=specs[0].dtype, device=self.device)
            dist.broadcast(flat, src=0, group=group)
            received = _split_flat(flat, specs)
        else:
            received = [(s.name, self._buffer(s)) for s in specs]
            handles = [dist.broadcast(t, src=0, group=group, async_op=True) for _, t in received]
            for handle in handles:
                handle.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the engine thread reads them next
        return received

    def _buffer(self, spec: TensorSpec) -> torch.Tensor:
        spare = self.spare.pop(spec.name, None)
        if spare is not None and spare.dtype == spec.dtype and tuple(spare.shape) == spec.shape:
            return spare
        return torch.empty(spec.shape, dtype=spec.dtype, device=self.device)

    def stage(self, weights: NamedTensors) -> None:
        self.staged.update(weights)

    def take_staged(self, weights: NamedTensors) -> NamedTensors:
        """Staged weights plus `weights` (which win on a repeated name); empties the stage."""
        merged = {**self.staged, **dict(weights)}
        self.staged.clear()
        return list(merged.items())

    def check_tensors(self, tensors: NamedTensors) -> None:
        """In-memory tensors (update_weights_from_tensor) against the model's table."""
        self.table.check(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors)

    def read_checkpoint(self, model_path: str) -> NamedTensors:
        """A whole replacement checkpoint, checked against the model, read into memory."""
        if not Path(model_path, "config.json").is_file():
            raise ValueError(f"no checkpoint at {model_path!r} (config.json not found)")
        self._check_config(model_path)
        tensors = list(iter_checkpoint_tensors(model_path))
        self.table.check(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors)
        missing = set(self.table.params) - {n for n, _ in tensors}
        if missing:
            raise ValueError(f"checkpoint {model_path!r} lacks tensors: "
                             f"{', '.join(sorted(missing))}")
        return tensors

    def _check_config(self, model_path: str) -> None:
        ours, theirs = self.model.config, load_model_config(model_path)
        free = {name: getattr(ours, name) for name in _FREE_CONFIG_FIELDS}
        theirs = dataclasses.replace(theirs, **free)
        differ = [f.name for f in dataclasses.fields(ours)
                  if not _same(getattr(ours, f.name), getattr(theirs, f.name))]
        if differ:
            raise ValueError(f"checkpoint {model_path!r} has another architecture "
                             f"(differs in: {', '.join(differ)})")

    # ---- engine thread ------------------------------------------------------------------

    def prepare(self, tensors: NamedTensors, owned: bool) -> NamedTensors:
        """Checked tensors as the model will hold them. `owned`: nobody else uses the tensor,
        so it may become the parameter without a copy when its dtype already matches."""
        out = []
        for name, tensor in tensors:
            if name == LM_HEAD_NAME and self.table.tie_word_embeddings:
                continue  # the embedding is the output projection; SGLang skips it too
            dtype = self.table.params[name].dtype
            out.append((name, tensor.to(self.device, dtype, copy=not owned).contiguous()))
        return out

    def install(self, weights: NamedTensors) -> None:
        """Put prepared weights in; their prepacked forms are made later by pack_some."""
        for name, weight in weights:
            free = self.model.install_weight(name, weight)
            if self.device.type == "cpu":
                self.spare[name] = free
            param = self.model.prepacked_param(name)
            if param is not None and can_pack(self.model.get_parameter(param)):
                self.unpacked[param] = None

    def pack_some(self, count: int | None) -> None:
        """Prepack up to `count` (None: all) parameters updated since their last packing,
        oldest first."""
        for param in list(itertools.islice(self.unpacked, count)):
            del self.unpacked[param]
            self.model.repack_weight(param)

    def read(self, name: str, truncate_size: int,
             whole: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> list:
        """The weight's first `truncate_size` rows as nested lists (SGLang's answer).
        `whole(name, share)` makes a tensor-parallel rank's share whole."""
        target = self.table.target(name)
        if target is None:
            raise ValueError(f"{name!r} is not a parameter of this model")
        weight = self.model.checkpoint_weight(target.name)
        if whole is not None:
            weight = whole(target.name, weight)
        return weight[:truncate_size].float().cpu().tolist()


def _split_flat(flat: torch.Tensor, specs: list[TensorSpec]) -> NamedTensors:
    out, start = [], 0
    for spec in specs:
        out.append((spec.name, flat[start : start + spec.numel].view(spec.shape)))
        start += spec.numel
    return out


def _same(ours: object, theirs: object) -> bool:
    """Equal, floats at float32 precision: the model computes with its hyper-parameters in
    float32 or narrower, and GGUF files store them as float32 (an rms_norm_eps of 1e-6
    comes back from one as 9.99999997e-07)."""
    if isinstance(ours, float) and isinstance(theirs, float):
        return struct.pack("f", ours) == struct.pack("f", theirs)
    if dataclasses.is_dataclass(ours) and type(ours) is type(theirs):
        return all(_same(getattr(ours, f.name), getattr(theirs, f.name))
                   for f in dataclasses.fields(ours))
    return ours == theirs
