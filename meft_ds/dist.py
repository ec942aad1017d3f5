"""Small torch.distributed helpers: rank, world, barrier, start-up checks.

Every helper works without an initialised process group (one process: rank 0 of 1).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from meft_ds.errors import UserError


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def comm_device(group=None) -> torch.device:
    """Where a collective's tensors must live: NCCL reduces device tensors only; gloo
    (and the CPU accelerator) host tensors."""
    if initialized() and "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)


def nodes_from_env(env: dict[str, str] | None = None) -> int:
    """Number of nodes the launcher announced (1 when it did not say)."""
    env = os.environ if env is None else env
    for key in ("CROSS_SIZE", "GROUP_WORLD_SIZE"):  # deepspeed launcher, torchrun
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    world, local = env.get("WORLD_SIZE", "1"), env.get("LOCAL_WORLD_SIZE", "")
    if world.isdigit() and local.isdigit() and int(local) > 0:
        return max(1, int(world) // int(local))
    return 1


def local_world_size(env: dict[str, str] | None = None) -> int:
    """Processes the launcher started on this node (torchrun: ``LOCAL_WORLD_SIZE``, the
    deepspeed launcher: ``LOCAL_SIZE``; 1 when it did not say)."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    return 1


def check_master_address(env: dict[str, str] | None = None) -> None:
    """A multi-node run cannot guess where rank 0 lives: refuse without MASTER_ADDR."""
    env = os.environ if env is None else env
    nodes = nodes_from_env(env)
    if nodes > 1 and not env.get("MASTER_ADDR"):
        raise UserError(
            f"multi-node run ({nodes} nodes) without a master address: set MASTER_ADDR or "
            "pass --master_addr to the launcher"
        )


def config_digest(config: Any) -> str:
    """A short stable hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(config: Any) -> None:
    """Refuse to train when ranks resolved different configurations.

    Every rank hashes its resolved configuration; the hashes are all-gathered (16 bytes
    per rank) and compared, so a node started with other flags or another config file
    stops at start-up instead of training something else silently.
    """
    size = world_size()
    if size == 1:
        return
    digest = torch.tensor(list(bytes.fromhex(config_digest(config))), dtype=torch.int64,
                          device=comm_device())
    gathered = [torch.empty_like(digest) for _ in range(size)]
    dist.all_gather(gathered, digest)
    ranks_by_digest: dict[bytes, list[int]] = {}
    for index, value in enumerate(gathered):
        ranks_by_digest.setdefault(bytes(value.cpu().tolist()), []).append(index)
    if len(ranks_by_digest) > 1:
        groups = "; ".join(
            f"ranks {','.join(map(str, ranks))}: {key.hex()}"
            for key, ranks in ranks_by_digest.items()
        )
        raise UserError(f"ranks resolved different configurations ({groups}); launch every "
                        "node with the same flags and config files")


def refuse_if_any(problem: str | None) -> None:
    """Raise ``problem`` on every rank when any rank has one (a rank that refused alone
    would leave the others waiting in their next collective)."""
    if world_size() > 1:
        flag = torch.tensor([0 if problem is None else 1], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and problem is None:
            problem = "another rank refused to start (see its error)"
    if problem is not None:
        raise UserError(problem)
