"""The classic weight-pruning recipes: scores and budgets from the literature, applied in one shot or iteratively."""

from __future__ import annotations

from . import Method, register

register(Method(
    "magnitude", "smallest |w| in each layer, same sparsity everywhere",
    "Han et al. 2015, Learning both Weights and Connections for Efficient Neural Networks",
))
register(Method(
    "global-magnitude", "smallest |w| across the network, each layer keeping at least min_keep weights",
    "Gupta et al. 2022, Is Complexity Required for Neural Network Pruning? (global magnitude with a minimum threshold)",
    budget="global",
))
register(Method(
    "random", "uniformly random weights, same sparsity in each layer",
    "Liu et al. 2022, The Unreasonable Effectiveness of Random Pruning",
    score="random",
))
register(Method(
    "erk-random", "random weights with Erdos-Renyi-Kernel layer densities",
    "Liu et al. 2022, The Unreasonable Effectiveness of Random Pruning (ERK from Evci et al. 2020, RigL)",
    score="random", budget="erk",
))
register(Method(
    "lamp", "layer-adaptive magnitude: global on w^2 normalised by the layer's larger weights",
    "Lee et al. 2021, Layer-adaptive Sparsity for the Magnitude-based Pruning",
    budget="lamp",
))
register(Method(
    "taylor", "Taylor (w dL/dw)^2 per calibration batch, averaged over n_batches (taylor_order=2: empirical-Fisher curvature)",
    "Molchanov et al. 2019, Importance Estimation for Neural Network Pruning",
    score="taylor", budget="global",
))
register(Method(
    "snip", "normalised connection sensitivity |g w| / sum |g w| on exactly one batch, at initialisation",
    "Lee et al. 2019, SNIP: Single-shot Network Pruning based on Connection Sensitivity",
    score="snip", budget="global",
))
register(Method(
    "grasp", "keep weights that preserve gradient flow: w * Hg",
    "Wang et al. 2020, Picking Winning Tickets Before Training by Preserving Gradient Flow",
    score="grasp", budget="global",
))
register(Method(
    "synflow", "data-free synaptic flow |w dR/dw|, 100 rounds on an exponential schedule",
    "Tanaka et al. 2020, Pruning neural networks without any data by iteratively conserving synaptic flow",
    score="synflow", budget="global", rounds=100,
))
register(Method(
    "rate-distortion", "per-layer sparsities minimising additive output distortion, by dynamic programming",
    "Xu et al. 2023, Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks",
    budget="rate-distortion",
))
