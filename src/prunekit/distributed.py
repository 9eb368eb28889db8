"""Data-parallel calibration with torch.distributed (gloo on CPU, NCCL on GPUs), launched with torchrun.

Every rank holds the whole model and a contiguous share of the calibration samples. Per block, each rank gathers the
input statistics of its own samples; the sums (token counts, per-column sums and sums of squares, SparseGPT's X X^T)
are all-reduced, so every rank prunes from the statistics of *all* samples and arrives at the same weights; each rank
then runs its own samples through the pruned block for the next one. Only the rank with `is_writer()` should save.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch

from prunekit.activations import InputStats
from prunekit.errors import ModelError, PruneError

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL when CUDA is available,
    else gloo. Returns whether a multi-rank group is running; a no-op without torchrun or when already joined."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return is_distributed()


def is_writer() -> bool:
    """True on the one rank that writes outputs (rank 0), and always without a process group."""
    return rank_and_world()[0] == 0


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's contiguous share. A world size that does not divide the count gives the first (count % world)
    ranks one item more; every rank needs at least one item."""
    count = len(items)
    if count < world:
        raise PruneError(f"{count} calibration samples cannot be shared by {world} ranks: give at least one per rank")
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (1 if rank < extra else 0)])


def check_same_version() -> None:
    """Refuse to run when the ranks import different prunekit versions (their pruning would differ)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    from prunekit import __version__

    versions: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(versions, __version__)
    if len(set(versions)) > 1:
        listing = ", ".join(f"rank {rank}: {version}" for rank, version in enumerate(versions))
        raise PruneError(f"the ranks run different prunekit versions ({listing}); install one version everywhere")


def all_reduce_stats(stats: dict[str, InputStats]) -> None:
    """Sum every accumulator over the ranks in place (layers sharing one accumulator are reduced once)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for accumulator in {id(s): s for s in stats.values()}.values():
        tokens = torch.tensor([accumulator.tokens], dtype=torch.float64)
        tensors = [tokens, accumulator.sum, accumulator.sum_sq]
        if accumulator.xtx is not None:
            tensors.append(accumulator.xtx)
        try:
            for tensor in tensors:
                dist.all_reduce(tensor)
        except RuntimeError as error:  # a peer died or left: stop here, before any output is written
            raise ModelError(f"distributed calibration stopped: another rank failed ({error})") from None
        accumulator.tokens = int(tokens.item())
