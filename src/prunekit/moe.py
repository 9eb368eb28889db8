"""MoE expert pruning, STUN-style (Lee et al. 2024): drop redundant experts, then prune inside the kept ones.

Experts whose router rows are close are chosen by similar tokens, so they are clustered by router-weight distance
(average-linkage agglomerative clustering, no forward pass) and one representative per cluster is kept: the member
nearest its cluster's mean router row. Tokens that went to a dropped expert now go to their next choice, most often
that representative. Router rows, the fused expert tensors and the config (number of experts, experts per token) are
updated together, so ``save_pretrained`` -> ``from_pretrained`` works without prunekit. Unstructured pruning inside
the kept experts follows (magnitude, or Wanda with each expert's own routed inputs).

transformers 5 stores the experts of a layer as fused 3-D parameters (experts.gate_up_proj [E, 2I, H],
experts.down_proj [E, H, I]) behind a top-k router (gate.weight [E, H]); that layout is what is handled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import ArgumentError, ModelError, check_sparsity, unknown_choice
from .llm import row_keep_mask, wanda_scores

# Router / experts classes whose forward this module has been checked against (softmax top-k over gate.weight rows;
# experts computing act(x W_gate) * (x W_up) W_down from the fused tensors).
ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter")
EXPERTS = ("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts")
COUNT_KEYS = ("num_local_experts", "num_experts")
METHODS = ("magnitude", "wanda")


@dataclass
class MoELayer:
    """One sparse MoE block: its router (gate) and fused experts."""

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        """Experts currently in the layer."""
        return int(self.router.weight.shape[0])


@dataclass
class MoEResult:
    """What expert pruning kept, and the sparsity reached inside the kept experts."""

    experts_before: int
    experts_after: int
    kept: dict[str, list[int]]
    clusters: dict[str, list[list[int]]] = field(default_factory=dict)
    expert_sparsity: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {"experts_before": self.experts_before, "experts_after": self.experts_after, "kept": self.kept,
                "clusters": self.clusters, "expert_sparsity": self.expert_sparsity}


# ---------------------------------------------------------------------------------------------------------------
# Finding the MoE layers


def _looks_like_moe(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return hasattr(module, "experts") or ("moe" in name and "block" in name)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of a transformers 5 model; an unrecognised router or experts class is named."""
    layers = []
    for name, module in model.named_modules():
        if not _looks_like_moe(module) or name.endswith(".experts"):
            continue
        router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        router_class = type(router).__name__ if router is not None else "none"
        experts_class = type(experts).__name__ if experts is not None else "none"
        if router_class not in ROUTERS or experts_class not in EXPERTS:
            raise ModelError(
                f"{name} ({type(module).__name__}) has router {router_class} and experts {experts_class}; expert "
                f"pruning knows the routers {', '.join(ROUTERS)} with experts {', '.join(EXPERTS)} "
                "(transformers 5 fused experts behind a softmax top-k router)")
        layers.append(MoELayer(name, module, router, experts))
    if not layers:
        raise ModelError(f"{type(model).__name__} has no sparse MoE layer (routers known: {', '.join(ROUTERS)})")
    return layers


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no transformers config to update")
    return config


def _count_key(config: Any) -> str:
    for key in COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return key
    raise ModelError(f"{type(config).__name__} has none of {', '.join(COUNT_KEYS)}: cannot record the expert count")


# ---------------------------------------------------------------------------------------------------------------
# Clustering by router weights (pure functions)


def router_distances(router_weight: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances between experts' router rows (E x E)."""
    w = router_weight.detach().double()
    return torch.cdist(w, w)


def cluster_experts(router_weight: torch.Tensor, n_clusters: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of experts into `n_clusters` groups by router-row distance."""
    count = router_weight.shape[0]
    if not 1 <= n_clusters <= count:
        raise ArgumentError("n_experts", n_clusters, f"an integer in [1, {count}]")
    distance = router_distances(router_weight)
    clusters: list[list[int]] = [[i] for i in range(count)]
    while len(clusters) > n_clusters:
        best: tuple[float, int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(distance[clusters[a]][:, clusters[b]].mean())
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best  # type: ignore[misc]
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


def representatives(router_weight: torch.Tensor, clusters: Sequence[Sequence[int]]) -> list[int]:
    """Per cluster, the expert whose router row is nearest the cluster's mean row (lowest index on ties)."""
    w = router_weight.detach().double()
    chosen = []
    for members in clusters:
        centre = w[list(members)].mean(dim=0)
        distances = (w[list(members)] - centre).norm(dim=1)
        chosen.append(int(members[int(torch.argmin(distances))]))
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------------------------
# Dropping experts


def _check_keep(layer: MoELayer, keep: Sequence[int]) -> list[int]:
    indices = sorted({int(i) for i in keep})
    if len(indices) != len(list(keep)) or not indices or indices[0] < 0 or indices[-1] >= layer.num_experts:
        raise ArgumentError(f"keep[{layer.name!r}]", list(keep),
                            f"distinct expert indices in [0, {layer.num_experts}), at least one")
    return indices


def drop_experts(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> None:
    """Keep only the listed experts of every MoE layer (the same count everywhere: the config holds one number)."""
    layers = {layer.name: layer for layer in find_moe_layers(model)}
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise unknown_choice("keep", unknown[0], layers)
    missing = sorted(set(layers) - set(keep))
    if missing:
        raise ArgumentError("keep", f"no entry for {missing[0]!r}", "one list of expert indices per MoE layer")
    checked = {name: _check_keep(layers[name], indices) for name, indices in keep.items()}
    counts = {len(v) for v in checked.values()}
    if len(counts) != 1:
        raise ArgumentError("keep", {k: len(v) for k, v in checked.items()},
                            "the same number of experts in every layer (the config stores one count)")
    new_count = counts.pop()
    config = _config(model)
    key = _count_key(config)
    for name, indices in checked.items():
        _slice_layer(layers[name], indices)
    setattr(config, key, new_count)
    top_k = getattr(config, "num_experts_per_tok", None)
    if isinstance(top_k, int) and top_k > new_count:
        config.num_experts_per_tok = new_count
    for layer in layers.values():
        for module in (layer.block, layer.router):
            if isinstance(getattr(module, "top_k", None), int):
                module.top_k = min(module.top_k, new_count)


def _slice_layer(layer: MoELayer, indices: list[int]) -> None:
    """Router rows and every fused expert tensor (leading dimension = experts) restricted to `indices`."""
    count = layer.num_experts
    index = torch.tensor(indices, dtype=torch.long)
    for module in (layer.router, layer.experts):
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 1 and param.shape[0] == count:
                sliced = nn.Parameter(param.detach().index_select(0, index.to(param.device)).clone(),
                                      requires_grad=param.requires_grad)
                setattr(module, pname, sliced)
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = len(indices)


def stun_keep(model: nn.Module, n_experts: int) -> tuple[dict[str, list[int]], dict[str, list[list[int]]]]:
    """Per MoE layer, the experts STUN keeps at `n_experts` (one per router-weight cluster) and the clusters."""
    layers = find_moe_layers(model)
    keep, clusters = {}, {}
    for layer in layers:
        if not isinstance(n_experts, int) or isinstance(n_experts, bool) or not 1 <= n_experts <= layer.num_experts:
            raise ArgumentError("n_experts", n_experts, f"an integer in [1, {layer.num_experts}]")
        groups = cluster_experts(layer.router.weight, n_experts)
        clusters[layer.name] = groups
        keep[layer.name] = representatives(layer.router.weight, groups)
    return keep, clusters


# ---------------------------------------------------------------------------------------------------------------
# Unstructured pruning inside the experts


def _expert_input_norms(model: nn.Module, layers: list[MoELayer], data: Iterable[Any]) -> dict[str, tuple]:
    """Per layer and expert: squared column norms of the inputs of gate_up_proj and down_proj (routed tokens only)."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook_for(layer: MoELayer):
        experts = layer.experts

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            count, inter = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
            sq_in, sq_mid = stats.setdefault(layer.name, (torch.zeros(count, hidden.shape[-1], dtype=torch.float64),
                                                          torch.zeros(count, inter, dtype=torch.float64)))
            with torch.no_grad():
                for e in range(count):
                    tokens = (index == e).any(dim=-1)
                    if not bool(tokens.any()):
                        continue
                    x = hidden[tokens].float()
                    gate, up = nn.functional.linear(x, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
                    mid = experts.act_fn(gate) * up
                    sq_in[e] += x.double().pow(2).sum(0).cpu()
                    sq_mid[e] += mid.double().pow(2).sum(0).cpu()

        return hook

    for layer in layers:
        handles.append(layer.experts.register_forward_pre_hook(hook_for(layer), with_kwargs=True))
    try:
        with torch.no_grad():
            for sample in data:
                ids = sample if isinstance(sample, torch.Tensor) else torch.as_tensor(sample)
                model(input_ids=ids.reshape(1, -1) if ids.dim() == 1 else ids)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def prune_experts(model: nn.Module, sparsity: float, method: str = "magnitude", data: Iterable[Any] | None = None) -> float:
    """Zero `sparsity` of every kept expert's weights, row by row (|W|, or Wanda's |W| x ||X|| with routed inputs)."""
    sparsity = check_sparsity(sparsity)
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    if method == "wanda" and data is None:
        raise ArgumentError("data", None, "calibration token sequences: wanda scores weights by their inputs")
    layers = find_moe_layers(model)
    model.eval()
    norms = _expert_input_norms(model, layers, data) if method == "wanda" else {}
    zeros = total = 0
    with torch.no_grad():
        for layer in layers:
            experts = layer.experts
            for pname, which in (("gate_up_proj", 0), ("down_proj", 1)):
                param = getattr(experts, pname)
                for e in range(param.shape[0]):
                    weight = param[e]
                    if method == "wanda":
                        scores = wanda_scores(weight, norms[layer.name][which][e].float())
                    else:
                        scores = weight.abs().float()
                    keep = row_keep_mask(scores, sparsity)
                    weight.mul_(keep.to(weight.dtype))
                zeros += int((param == 0).sum())
                total += param.numel()
    return zeros / total if total else 0.0


def stun(model: nn.Module, n_experts: int, sparsity: float = 0.0, *, method: str = "magnitude",
         data: Iterable[Any] | None = None) -> MoEResult:
    """STUN: keep `n_experts` per layer (router-weight clusters), then prune `sparsity` inside the kept experts."""
    sparsity = check_sparsity(sparsity)
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    before = find_moe_layers(model)[0].num_experts
    keep, clusters = stun_keep(model, n_experts)
    drop_experts(model, keep)
    reached = prune_experts(model, sparsity, method, data) if sparsity > 0 else 0.0
    return MoEResult(before, n_experts, keep, clusters, reached)
