"""The weight-sync process group, built exactly as SGLang builds it (its
`init_custom_process_group`), so trainers written for SGLang interoperate unchanged:

1. a TCP rendezvous at `tcp://master_address:master_port` (rank 0 hosts the store),
2. the store wrapped in `PrefixStore(group_name, store)`,
3. a named, non-default process group over it (`_new_process_group_helper`).

No default (WORLD) group is created, so a process can hold this group next to any other
torch.distributed setup. The trainer and the engine both call `init_weights_group`.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch's default_pg_timeout, as SGLang uses


def init_weights_group(
    *, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
    backend: str = "gloo", timeout: timedelta = DEFAULT_TIMEOUT,
) -> dist.ProcessGroup:
    """Join the group as `rank`; blocks until all `world_size` ranks have joined."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if group_name in c10d._world.pg_names.values():
        raise ValueError(f"a process group named {group_name!r} already exists here")
    url = f"tcp://{_host_for_url(master_address)}:{master_port}"
    store, rank, world_size = next(c10d.rendezvous(url, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    # An empty rank list is the "default group" form of the helper: it skips the membership
    # check against a WORLD group that does not exist here (what SGLang passes too).
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name,
        timeout=timeout,
    )
    # Group ranks equal "global" ranks, so broadcast(src=0, group=group) resolves src.
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_weights_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)


def _host_for_url(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
