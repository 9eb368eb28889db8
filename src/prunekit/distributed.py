"""Data-parallel calibration with torch.distributed (gloo on CPU, NCCL for CUDA tensors), launched with torchrun.

Every rank holds the whole model and a contiguous share of the calibration samples. Per block, each rank gathers the
input statistics of its own samples. Wanda's small sums (token counts, per-column sums and sums of squares) are
all-reduced, so every rank prunes every layer from the statistics of *all* samples. SparseGPT's X X^T is summed on one
owner rank per group of layers sharing an input (`prune_on_owners`): the owner solves those layers and broadcasts their
new weights, so the solves are spread over the ranks and every rank still ends with the same weights. Each rank then
runs its own samples through the pruned block for the next one. Only the rank with `is_writer()` should save.

A rank that fails (an exception, a crash, a lost machine) stops the others: their next collective raises ModelError
instead of waiting forever, so no rank writes a partial model. A peer that is alive but silent is given up on after
PRUNEKIT_DIST_TIMEOUT seconds (default 30 minutes).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from prunekit.activations import InputStats
from prunekit.errors import ArgumentError, ModelError, PruneError

if TYPE_CHECKING:
    from prunekit.selection import Target

T = TypeVar("T")

TIMEOUT_VARIABLE = "PRUNEKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = timedelta(minutes=30)


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


def timeout_from_environment(environ: Mapping[str, str] = os.environ) -> timedelta:
    """How long a collective waits for a silent peer: PRUNEKIT_DIST_TIMEOUT seconds, else 30 minutes (a block's
    statistics pass on a large model can take many minutes, so a shorter default would stop healthy runs)."""
    value = environ.get(TIMEOUT_VARIABLE)
    if value is None or value.strip() == "":
        return DEFAULT_TIMEOUT
    allowed = "a positive number of seconds (default 1800)"
    try:
        seconds = float(value)
    except ValueError:
        raise ArgumentError(TIMEOUT_VARIABLE, value, allowed) from None
    if not 0 < seconds < float("inf"):  # also refuses nan
        raise ArgumentError(TIMEOUT_VARIABLE, value, allowed)
    return timedelta(seconds=seconds)


def backend_for(cuda_available: bool) -> str:
    """gloo for CPU tensors (the statistics always live there), plus NCCL for CUDA tensors when there are GPUs."""
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), with the timeout of
    `timeout_from_environment` (PRUNEKIT_DIST_TIMEOUT seconds, default 30 minutes). Returns whether a multi-rank
    group is running; a no-op without torchrun or when already joined."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        timeout = timeout_from_environment()
        if torch.cuda.is_available():  # one GPU per rank: collectives on CUDA tensors go to this rank's device
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend_for(torch.cuda.is_available()), timeout=timeout)
    return is_distributed()


def local_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` (torchrun sets LOCAL_RANK) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): `local_device()`; otherwise the named device, checked to exist."""
    from prunekit.errors import ArgumentError

    if device is None or device == "auto":
        return local_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError("device", device, "auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", device, "auto or cpu: this machine has no CUDA device")
    if resolved.type not in ("cpu", "cuda"):
        raise ArgumentError("device", device, "auto, cpu, cuda or cuda:N")
    return resolved


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


@contextmanager
def peer_failures() -> Iterator[None]:
    """Report a failed collective as ModelError. gloo and NCCL raise RuntimeError (DistBackendError) when a peer
    died, closed its connection or stayed silent past the timeout; stopping here leaves nothing half-written."""
    try:
        yield
    except RuntimeError as error:
        raise ModelError(f"distributed calibration stopped: another rank failed or did not answer ({error}); "
                         "see that rank's own error for the cause") from None


def check_same_version() -> None:
    """Refuse to run when the ranks import different prunekit versions (their pruning would differ)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    from prunekit import __version__

    versions: list[str | None] = [None] * dist.get_world_size()
    with peer_failures():
        dist.all_gather_object(versions, __version__)
    if len(set(versions)) > 1:
        listing = ", ".join(f"rank {rank}: {version}" for rank, version in enumerate(versions))
        raise PruneError(f"the ranks run different prunekit versions ({listing}); install one version everywhere")


def _distinct(stats: Mapping[str, InputStats]) -> list[InputStats]:
    """Each accumulator once (layers fed the same input share one), in the order of `stats`."""
    return list({id(s): s for s in stats.values()}.values())


def all_reduce_stats(stats: dict[str, InputStats]) -> None:
    """Sum every accumulator over the ranks in place (layers sharing one accumulator are reduced once)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for accumulator in _distinct(stats):
        tokens = torch.tensor([accumulator.tokens], dtype=torch.float64)
        tensors = [tokens, accumulator.sum, accumulator.sum_sq]
        if accumulator.xtx is not None:
            tensors.append(accumulator.xtx)
        with peer_failures():
            for tensor in tensors:
                dist.all_reduce(tensor)
        accumulator.tokens = int(tokens.item())


# --- SparseGPT: each Hessian summed on, and solved by, one owner rank -------------------------------------------------


def shared_input_groups(names: Sequence[str], stats: Mapping[str, InputStats]) -> list[list[str]]:
    """The layers in `names` grouped by the accumulator they share (q/k/v, gate/up), in the order of `names`."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(stats[name]), []).append(name)
    return list(groups.values())


def solve_cost(inputs: int, outputs: Sequence[int]) -> float:
    """Rough SparseGPT work for one input group: inverting the inputs x inputs Hessian once (the layers of a group
    share it), then sweeping it over each layer's weight (`outputs`: each layer's output count)."""
    return float(inputs) ** 3 + sum(float(inputs) ** 2 * count for count in outputs)


def _group_cost(group: Sequence[Target], accumulator: InputStats) -> float:
    inputs = accumulator.features
    return solve_cost(inputs, [target.weight.numel() // inputs for target in group])


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The owner rank of each group: costliest first, each to the least-loaded rank (ties to the lower rank and the
    earlier group). It depends on the costs alone, so every rank computes the same owners."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for group in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        owner = min(range(world), key=lambda rank: (loads[rank], rank))
        owners[group] = owner
        loads[owner] += costs[group]
    return owners


def reduce_to_owner(accumulator: InputStats, owner: int) -> None:
    """Sum the token count and X X^T of `accumulator` over the ranks onto `owner` (in place there). On the other
    ranks both are left undefined: they do not solve this group."""
    import torch.distributed as dist

    tokens = torch.tensor([accumulator.tokens], dtype=torch.float64)
    with peer_failures():
        dist.reduce(tokens, dst=owner)
        dist.reduce(accumulator.xtx, dst=owner)
    accumulator.tokens = int(tokens.item())


def broadcast_from_owner(weights: Sequence[torch.Tensor], owner: int) -> None:
    """Overwrite `weights` on every rank with the owner's (in place, so the model's parameters change)."""
    import torch.distributed as dist

    for weight in weights:
        data = weight.detach()
        buffer = data if data.is_contiguous() else data.contiguous()  # gloo sends contiguous memory only
        with peer_failures():
            dist.broadcast(buffer, src=owner)
        if buffer is not data:
            data.copy_(buffer)


def prune_on_owners(targets: Sequence[Target], stats: Mapping[str, InputStats],
                    prune_group: Callable[[Sequence[str]], object]) -> None:
    """SparseGPT under torch.distributed: each group of layers sharing an input gets an owner rank, which alone
    receives the summed X X^T, runs `prune_group` on the group's layer names and broadcasts their new weights. Every
    rank ends with the same weights, while each solves only its own share."""
    rank, world = rank_and_world()
    by_name = {t.name: t for t in targets}
    groups = shared_input_groups([t.name for t in targets], stats)
    costs = [_group_cost([by_name[name] for name in group], stats[group[0]]) for group in groups]
    owners = assign_owners(costs, world)
    for group, owner in zip(groups, owners):
        reduce_to_owner(stats[group[0]], owner)
    for group, owner in zip(groups, owners):
        if owner == rank:
            prune_group(group)
    for group, owner in zip(groups, owners):
        broadcast_from_owner([by_name[name].weight for name in group], owner)
