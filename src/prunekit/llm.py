"""Post-training pruning of causal LMs with calibration data: Wanda and SparseGPT, with uniform or OWL allocation.

Runs on the block-by-block engine of calibration.py: each decoder block gathers its linear layers' input statistics
over the calibration set (the pass stops at the block's last linear layer: nothing after it is needed), prunes them,
and hands its pruned outputs to the next block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import masks as mask_engine
from .activations import InputStats
from .distributed import (all_reduce_stats, check_same_version, is_distributed, prune_on_owners, rank_and_world,
                          shard, shared_input_groups)
from .errors import ArgumentError, ModelError, PruneError, check_sparsity, unknown_choice
from .layout import from_matrix, input_channels, to_matrix
from .patterns import NM, Unstructured, parse_pattern
from .reconstruct.sparsegpt import sparsegpt_prune_group
from .report import Report, layer_sparsity
from .selection import Target, select

SOLVERS = ("wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")
# "sequential": each block's statistics from the pruned outputs of the blocks before it (the papers' procedure);
# "one-pass": every layer's statistics from one forward pass of the dense model (no propagation pass; faster, less exact)
CALIBRATIONS = ("sequential", "one-pass")


@dataclass(frozen=True)
class LLMSettings:
    """Validated settings of one LLM pruning run."""

    solver: str
    pattern: Unstructured | NM
    sparsities: list[float]  # one per decoder block
    allocation: str
    blocksize: int
    dampening: float
    owl_m: float
    owl_lambda: float


# --- pure pieces ----------------------------------------------------------------------------------------------------


def wanda_scores(weight_matrix: torch.Tensor, column_norm_sq: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2024): |W_ij| * ||X_j||_2, for an (outputs x inputs) weight."""
    return weight_matrix.detach().abs().float() * column_norm_sq.to(weight_matrix.device).sqrt().reshape(1, -1)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the round(sparsity * inputs) lowest scores of every output row (Wanda's comparison group)."""
    rows, cols = scores.shape
    k = round(sparsity * cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        # topk selects without a full sort (several times faster on wide layers); the count stays exact.
        drop = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, drop, False)
    return keep


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """OWL's layer outlier ratio: the share of scores above m times their mean."""
    flat = scores.reshape(-1).float()
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al. 2024): S_l = S - (r_l - mean r), r the outlier ratios rescaled to [0, 2 lambda]."""
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0:
        return [sparsity] * len(ratios)
    r = (r - r.min()) / spread * (2 * lam)
    result = sparsity - (r - r.mean())
    if float(result.max()) >= 1 or float(result.min()) < 0:
        raise ArgumentError("owl_lambda", lam, f"a smaller value: with sparsity {sparsity} it pushes a block outside [0, 1)")
    return [float(s) for s in result]


# --- validation -----------------------------------------------------------------------------------------------------


def _resolve_sparsities(sparsity: Any, n_blocks: int, pattern) -> list[float]:
    if isinstance(pattern, NM):
        implied = 1 - pattern.n / pattern.m
        if sparsity is not None and (isinstance(sparsity, (list, tuple)) or abs(check_sparsity(sparsity) - implied) > 1e-9):
            raise ArgumentError("sparsity", sparsity, f"{implied:g} (or None): pattern {pattern.name} fixes it")
        return [implied] * n_blocks
    if isinstance(sparsity, (list, tuple)):
        if len(sparsity) != n_blocks:
            raise ArgumentError("sparsity", f"<list of {len(sparsity)}>",
                                f"one number, or a list with one sparsity per decoder block ({n_blocks})")
        return [check_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(sparsity)]
    if sparsity is None:
        raise ArgumentError("sparsity", None, "a number in [0, 1), or a list with one per decoder block")
    return [check_sparsity(sparsity)] * n_blocks


def _settings(model, solver, sparsity, pattern, allocation, blocksize, dampening, owl_m, owl_lambda, n_blocks):
    if solver not in SOLVERS:
        raise unknown_choice("solver", solver, SOLVERS)
    if allocation not in ALLOCATIONS:
        raise unknown_choice("allocation", allocation, ALLOCATIONS)
    pattern = parse_pattern(pattern)
    if not isinstance(pattern, (Unstructured, NM)):
        raise ArgumentError("pattern", pattern.name, "'unstructured' or N:M for calibration-based LLM pruning")
    if isinstance(pattern, NM) and allocation == "owl":
        raise ArgumentError("allocation", allocation, "'uniform' with an N:M pattern (N:M fixes every layer's sparsity)")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ArgumentError("blocksize", blocksize, "a positive integer (128 in the paper)")
    if isinstance(pattern, NM) and blocksize % pattern.m:
        raise ArgumentError("blocksize", blocksize, f"a multiple of M={pattern.m} so N:M groups never straddle blocks")
    if not isinstance(dampening, (int, float)) or not 0 < dampening < 1:
        raise ArgumentError("dampening", dampening, "a number in (0, 1); 0.01 in the paper")
    if not isinstance(owl_m, (int, float)) or owl_m <= 0:
        raise ArgumentError("owl_m", owl_m, "a positive number (5 in the paper)")
    if not isinstance(owl_lambda, (int, float)) or not 0 <= owl_lambda < 0.5:
        raise ArgumentError("owl_lambda", owl_lambda, "a number in [0, 0.5) (0.08 in the paper)")
    sparsities = _resolve_sparsities(sparsity, n_blocks, pattern)
    if allocation == "owl" and len(set(sparsities)) > 1:
        raise ArgumentError("sparsity", "<list>", "one number when allocation='owl' (OWL sets the per-block values)")
    return LLMSettings(solver, pattern, sparsities, allocation, blocksize, float(dampening), float(owl_m),
                       float(owl_lambda))


def _block_targets(model: nn.Module, blocks: nn.ModuleList, include, ignore) -> list[list[Target]]:
    """The selected linear layers of every decoder block (layers outside the blocks are never touched here)."""
    from .hf import linear_layers_of

    chosen = {id(t.module): t for t in select(model, types=("linear",), include=include, ignore=ignore).targets}
    per_block = [[chosen[id(m)] for m in linear_layers_of(block).values() if id(m) in chosen] for block in blocks]
    if not any(per_block):
        raise ArgumentError("include", include, "a selection that matches linear layers inside the decoder blocks")
    return per_block


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(model: nn.Module, samples: Sequence[torch.Tensor], targets: list[list[Target]], solver: str,
                 all_blocks: bool = False) -> int:
    """Refuse a job predicted not to fit: hidden states of every sample, plus the largest block's Hessians (every
    block's with `all_blocks`, as one-pass calibration holds them all at once)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 0
    tokens = sum(int(s.numel()) for s in samples)
    need = 2 * tokens * hidden * 4  # the resident hidden states and one block's outputs, fp32
    per_block = [sum(_inputs(t) * ((_inputs(t) + 3) if solver == "sparsegpt" else 3) * 4 for t in block)
                 for block in targets]
    stats = sum(per_block) if all_blocks else max(per_block, default=0)
    need += stats
    available = _available_memory()
    if available is not None and need > 0.9 * available:
        raise PruneError(
            f"this job needs about {need / 2**30:.1f} GiB beyond the model ({tokens} calibration tokens x hidden "
            f"{hidden}, plus statistics) but only {available / 2**30:.1f} GiB is available; use fewer or shorter samples"
        )
    return need


def _inputs(target: Target) -> int:
    return input_channels(target.weight.shape, target.kind)


# --- the run --------------------------------------------------------------------------------------------------------


class _StopBlock(Exception):
    """Ends a statistics pass once the block's last linear layer has seen its input."""


def gather_stats(feed, layers: dict[str, nn.Module], hessian: bool) -> dict[str, InputStats]:
    """Input statistics of `layers` over all samples of a block; layers fed the same tensor share one accumulator.

    The first sample runs whole and shows the execution order and which layers share an input (q/k/v, gate/up);
    the others stop at the block's last linear layer, since nothing after it feeds a statistic.
    """
    order: list[str] = []
    groups: list[tuple[torch.Tensor, list[str]]] = []  # input tensor (held, so ids are not reused) -> layers it fed
    stats: dict[str, InputStats] = {}

    def trace(name: str, x: torch.Tensor) -> None:
        if name in stats:
            return
        order.append(name)
        members = next((m for tensor, m in groups if tensor is x), None)
        if members is None:
            members = []
            groups.append((x, members))
            shared = InputStats(x.shape[-1], hessian)
            shared.update(x)
        else:
            shared = stats[members[0]]
        members.append(name)
        stats[name] = shared

    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: trace(n, args[0])) for n, m in layers.items()]
    try:
        feed.run_sample(0)
    finally:
        for h in handles:
            h.remove()
    if len(feed) == 1:
        return stats

    def stop(_module, _args):
        raise _StopBlock

    leaders = [members[0] for _, members in groups]
    groups.clear()
    handles = [layers[n].register_forward_pre_hook(lambda _m, args, s=stats[n]: s.update(args[0])) for n in leaders]
    handles.append(layers[order[-1]].register_forward_pre_hook(stop))  # after the stats hooks, so it fires last
    try:
        for sample in range(1, len(feed)):
            try:
                feed.run_sample(sample)
            except _StopBlock:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def prune_group(targets: Sequence[Target], stats: InputStats, settings: LLMSettings, sparsity: float) -> list[torch.Tensor]:
    """Prune layers fed the same input (one shared accumulator: q/k/v, gate/up) in place; returns their keep-masks.

    SparseGPT sweeps the group's stacked rows once (`sparsegpt_prune_group`); Wanda prunes each layer alone."""
    pattern = settings.pattern
    matrices = [to_matrix(t.weight.detach(), t.kind) for t in targets]
    keeps = []
    if settings.solver == "wanda":
        for target, matrix in zip(targets, matrices):
            scores = wanda_scores(matrix, stats.column_norm_sq)
            if isinstance(pattern, NM):
                keep = to_matrix(pattern.mask(scores, "linear"), "linear")
            else:
                keep = row_keep_mask(scores, sparsity)
            target.weight.masked_fill_(~from_matrix(keep, target.kind, target.weight.shape), 0)
            keeps.append(keep)
    else:
        n, m = (pattern.n, pattern.m) if isinstance(pattern, NM) else (None, None)
        solved = sparsegpt_prune_group(matrices, stats.inverse_factor(settings.dampening), sparsity, n, m,
                                       settings.blocksize)
        for target, (updated, keep) in zip(targets, solved):
            weight = target.weight
            weight.copy_(from_matrix(updated.to(weight.dtype), target.kind, weight.shape))
            keeps.append(keep)
    return [from_matrix(keep, t.kind, t.weight.shape) for t, keep in zip(targets, keeps)]


def prune_block(feed, block_targets: list[Target], settings: LLMSettings, sparsity: float,
                stats: dict[str, InputStats] | None = None) -> None:
    """Gather one block's input statistics over the calibration samples (all ranks' under torch.distributed) and
    prune its selected linear layers in place. `stats`: already gathered (one-pass calibration); `feed` is then
    not run."""
    if not block_targets:
        return
    if stats is None:
        stats = gather_stats(feed, {t.name: t.module for t in block_targets}, settings.solver == "sparsegpt")
    by_name = {t.name: t for t in block_targets}

    def prune(names: Sequence[str]) -> None:
        prune_group([by_name[name] for name in names], stats[names[0]], settings, sparsity)

    if settings.solver == "sparsegpt" and is_distributed():
        prune_on_owners(block_targets, stats, prune)  # each group solved once, by one rank, then broadcast
    else:
        all_reduce_stats(stats)  # with torch.distributed: the statistics of every rank's samples
        for names in shared_input_groups([t.name for t in block_targets], stats):
            prune(names)
    for t in block_targets:
        if not torch.isfinite(t.weight).all():
            raise PruneError(f"pruning produced non-finite weights in {t.name!r}; raise dampening")


class _ModelFeed:
    """The whole dense model as a statistics feed: `run_sample` runs one calibration sample through it, so hooks on
    the layers of every block fire in one forward pass (one-pass calibration)."""

    def __init__(self, model: nn.Module, samples: Sequence[torch.Tensor]) -> None:
        self.model, self.samples = model, samples

    def __len__(self) -> int:
        """Number of calibration samples."""
        return len(self.samples)

    def run_sample(self, sample: int) -> None:
        """One no-grad, no-cache forward pass of sample `sample`."""
        from .calibration import _input_device

        with torch.no_grad():
            self.model(input_ids=self.samples[sample].to(_input_device(self.model)), use_cache=False)


def _without_hessians(stats: dict[str, InputStats]) -> dict[str, InputStats]:
    """Copies of the accumulators' token counts and column sums (no X X^T), still shared as the originals are."""
    copies: dict[int, InputStats] = {}
    for source in stats.values():
        if id(source) not in copies:
            copy = InputStats(source.features, hessian=False)
            copy.tokens, copy.sum, copy.sum_sq = source.tokens, source.sum.clone(), source.sum_sq.clone()
            copies[id(source)] = copy
    return {name: copies[id(source)] for name, source in stats.items()}


def one_pass_stats(model: nn.Module, samples: Sequence[torch.Tensor], targets: list[list[Target]],
                   hessian: bool) -> dict[str, InputStats]:
    """Every target layer's input statistics from one forward pass of the dense model per sample (each sample stops
    at the last target layer: the head is not run)."""
    was_training = model.training
    model.eval()
    try:
        return gather_stats(_ModelFeed(model, samples), {t.name: t.module for b in targets for t in b}, hessian)
    finally:
        model.train(was_training)


def block_outlier_ratio(block_targets: Sequence[Target], stats: dict[str, InputStats], settings: LLMSettings) -> float:
    """OWL's outlier ratio of one block: over the Wanda scores of all its selected layers together."""
    scores = [wanda_scores(to_matrix(t.weight, t.kind), stats[t.name].column_norm_sq).reshape(-1) for t in block_targets]
    return outlier_ratio(torch.cat(scores), settings.owl_m)


def owl_ratios(model, samples, targets: list[list[Target]], settings: LLMSettings, progress: bool) -> list[float]:
    """Outlier ratio of every block's Wanda scores, on the dense model (a first, statistics-only pass)."""
    from .calibration import run_blocks

    ratios: list[float] = []

    def measure(index, name, block, feed):
        layers = {t.name: t.module for t in targets[index]}
        stats = gather_stats(feed, layers, hessian=False)
        all_reduce_stats(stats)
        ratios.append(block_outlier_ratio(targets[index], stats, settings))

    run_blocks(model, samples, measure, progress=progress)
    return ratios


def prune_causal_lm(
    model: nn.Module,
    samples: Sequence[torch.Tensor],
    sparsity: float | Sequence[float] | None,
    *,
    solver: str = "wanda",
    pattern: str = "unstructured",
    allocation: str = "uniform",
    include=None,
    ignore=None,
    blocksize: int = 128,
    dampening: float = 0.01,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    calibration: str = "sequential",
    apply: str = "bake",
    checkpoint_dir=None,
    progress: bool = True,
) -> Report:
    """Prune the blocks of a transformers causal LM (or encoder, e.g. BERT) with Wanda or SparseGPT on calibration
    token sequences.

    calibration="sequential" (the papers' procedure) feeds each block the pruned outputs of the blocks before it;
    "one-pass" takes every layer's statistics from one forward pass of the dense model and prunes afterwards (no
    propagation pass: faster, but later blocks are not fitted to the earlier blocks' pruning errors)."""
    from .calibration import _check_samples, run_blocks
    from .hf import check_calibration_model, find_decoder_blocks

    started = time.perf_counter()
    check_calibration_model(model)
    if apply not in ("mask", "bake"):
        raise unknown_choice("apply", apply, ("mask", "bake"))
    if calibration not in CALIBRATIONS:
        raise unknown_choice("calibration", calibration, CALIBRATIONS)
    one_pass = calibration == "one-pass"
    if one_pass and checkpoint_dir is not None:
        raise ArgumentError("checkpoint_dir", str(checkpoint_dir), "None with calibration='one-pass' (checkpoints "
                            "resume the sequential block-by-block pass; a one-pass run has no blocks to resume)")
    _, blocks = find_decoder_blocks(model)
    settings = _settings(model, solver, sparsity, pattern, allocation, blocksize, dampening, owl_m, owl_lambda,
                         len(blocks))
    targets = _block_targets(model, blocks, include, ignore)
    for block_targets in targets:
        for t in block_targets:
            settings.pattern.validate(t.name, t.weight.shape, t.kind)
            if not torch.is_floating_point(t.weight):
                raise ModelError(f"layer {t.name!r} has {t.weight.dtype} weights; prune the float model")
    samples = _check_samples(model, samples)
    check_memory(model, samples, targets, settings.solver, all_blocks=one_pass)
    all_samples = samples
    if is_distributed():
        if checkpoint_dir is not None:
            raise ArgumentError("checkpoint_dir", str(checkpoint_dir), "None under torch.distributed (each rank holds "
                                "different activations; resume is for single-process runs)")
        check_same_version()
        samples = shard(samples, *rank_and_world())

    sparsities = settings.sparsities
    ratios = None
    if one_pass:
        stats = one_pass_stats(model, samples, targets, settings.solver == "sparsegpt")
        if settings.allocation == "owl":  # the ratios are the dense model's: the same statistics serve
            norms = _without_hessians(stats)
            all_reduce_stats(norms)  # copies: prune_block sums the statistics themselves over the ranks
            ratios = [block_outlier_ratio(block_targets, norms, settings) for block_targets in targets]
            sparsities = owl_sparsities(ratios, sparsities[0], settings.owl_lambda)
        for index, block_targets in enumerate(tqdm(targets, desc="prune blocks", disable=not progress)):
            prune_block(None, block_targets, settings, sparsities[index], {t.name: stats[t.name] for t in block_targets})
            for t in block_targets:  # each block's statistics are released once it is pruned
                stats.pop(t.name)
    else:
        if settings.allocation == "owl":
            ratios = owl_ratios(model, samples, targets, settings, progress)
            sparsities = owl_sparsities(ratios, sparsities[0], settings.owl_lambda)

        def process(index, name, block, feed):
            prune_block(feed, targets[index], settings, sparsities[index])

        fingerprint = dict(solver=settings.solver, pattern=settings.pattern.name, sparsities=sparsities,
                           blocksize=settings.blocksize, dampening=settings.dampening, include=include, ignore=ignore)
        run_blocks(model, samples, process, checkpoint_dir=checkpoint_dir, settings=fingerprint, progress=progress)

    flat = [t for block_targets in targets for t in block_targets]
    if apply == "mask":  # masks are rebuilt from the zeros, so runs resumed from a checkpoint get them too
        for t in flat:
            mask_engine.attach(t.module, t.weight.detach() != 0, t.param_name)
    extra: dict[str, Any] = {"calibration": calibration, "block_sparsities": sparsities, "calibration_samples": len(all_samples),
                             "calibration_tokens": sum(int(s.numel()) for s in all_samples),
                             "world_size": rank_and_world()[1]}
    if ratios is not None:
        extra["owl_outlier_ratios"] = ratios
    skipped = [(n, r) for n, r in select(model, types=("linear",), include=include, ignore=ignore).skipped]
    return Report(
        layers=[layer_sparsity(t, settings.pattern.name) for t in flat],
        method=f"{settings.solver}{'+owl' if ratios is not None else ''}",
        arguments=dict(solver=settings.solver, sparsity=sparsity if not isinstance(sparsity, (list, tuple)) else list(sparsity),
                       pattern=settings.pattern.name, allocation=settings.allocation, blocksize=settings.blocksize,
                       dampening=settings.dampening, owl_m=settings.owl_m, owl_lambda=settings.owl_lambda,
                       calibration=calibration, apply=apply, include=include, ignore=ignore),
        skipped=skipped, seconds=time.perf_counter() - started, extra=extra,
    )
