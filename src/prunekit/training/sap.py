"""SAP, sparsity-informed adaptive pruning (Diao, Wang, Zhang, Yang, Ding & Tarokh 2023, Pruning Deep Neural
Networks from a Sparsity Perspective, ICLR).

Iterative pruning whose amount per round is read off the weights instead of fixed: after training, the PQ Index
I of the remaining weights (p = 0.5, q = 1) gives a lower bound on how many of the d remaining weights must stay,
r = ceil(d (1 + eta)^(q/(p-q)) (1 - I)^(qp/(q-p))), and the round prunes floor(d * clip(gamma (1 - r/d), 0, beta))
of them by magnitude (globally, or layer by layer with scope='layer'). A dense, compressible network loses much;
one whose remaining weights are all alike loses nothing. As in the paper, ``run`` rewinds the survivors to their
initial values (or to step `rewind_step`) after each round, lottery-ticket style; as a callback with `prune_every`
it prunes in place every that many epochs instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, unknown_choice
from ..scores.pq import check_pq, pq_index, sap_keep_bound, sap_prune_count
from .common import attach_keeping, check_real, kept_mask, lowest, targets_of
from .lottery import LotteryTicket
from .schedules import check_step

SAP_SCOPES = ("global", "layer")


@dataclass
class SAPRound:
    """One SAP round: the PQ index and count of the remaining weights, the retain bound, how many went."""

    index: float
    remaining: int
    keep_bound: int
    pruned: int
    density: float  # of the selected weights after the round


class SAP(LotteryTicket):
    """Iterative pruning with the amount set each round by the PQ Index (the paper's defaults: p=0.5, q=1,
    eta=0, gamma=1, beta=0.9). ``run(rounds, train_fn)`` trains, prunes and rewinds `rounds` times.

    types / include / ignore choose the layers as in prunekit.prune (default: every Linear and Conv).
    """

    def __init__(self, model: nn.Module, rewind_step: int = 0, *, p: float = 0.5, q: float = 1.0, eta: float = 0.0,
                 gamma: float = 1.0, beta: float = 0.9, scope: str = "global", prune_every: int | None = None,
                 types: Any = ("linear", "conv"), include: Any = None, ignore: Any = None) -> None:
        self.p, self.q = check_pq(p, q)
        self.eta = check_real(eta, "eta", 0.0, float("inf"), high_open=True, meaning="the retain bound's slack")
        self.gamma = check_real(gamma, "gamma", 0.0, float("inf"), low_open=True, high_open=True,
                                meaning="the pruning rate's multiplier")
        self.beta = check_real(beta, "beta", 0.0, 1.0, low_open=True, high_open=True,
                               meaning="the largest share of the remaining weights one round may prune")
        if scope not in SAP_SCOPES:
            raise unknown_choice("scope", scope, SAP_SCOPES)
        if prune_every is not None:
            check_step(prune_every, "prune_every", minimum=1)
        self.scope, self.prune_every = scope, prune_every
        self.selection = {"types": types, "include": include, "ignore": ignore}
        self.targets = targets_of(model, types, include, ignore)
        super().__init__(model, rate=0.5, rewind_step=rewind_step, **self.selection)
        self.history: list[SAPRound] = []

    def target_density(self, rounds: int | None = None) -> float:
        """SAP has no fixed schedule: the density measured after `rounds` rounds (default: the rounds done)."""
        rounds = self.rounds_done if rounds is None else check_step(rounds, "rounds")
        if rounds > self.rounds_done:
            raise ArgumentError("rounds", rounds, f"at most the {self.rounds_done} rounds done",
                                "SAP sets each round's amount from the weights it sees then.")
        return self.densities[rounds]

    def _plan(self, values: list[torch.Tensor], kept: list[torch.Tensor]) -> tuple[list[torch.Tensor], SAPRound]:
        """The entries to prune among `kept`, by the SAP rule on the kept values taken together."""
        live = torch.cat([v[k].reshape(-1) for v, k in zip(values, kept)]).double()
        d = int(live.numel())
        if d == 0 or not bool((live != 0).any()):
            return [torch.zeros_like(k) for k in kept], SAPRound(0.0, d, d, 0, 0.0)
        index = pq_index(live, self.p, self.q)
        n = sap_prune_count(index, d, self.p, self.q, self.eta, self.gamma, self.beta)
        flat = torch.cat([v.reshape(-1).double() for v in values])
        chosen = lowest(flat, n, torch.cat([k.reshape(-1) for k in kept]))
        parts = list(torch.split(chosen, [v.numel() for v in values]))
        record = SAPRound(index, d, sap_keep_bound(index, d, self.p, self.q, self.eta), n, 0.0)
        return [part.reshape(v.shape) for part, v in zip(parts, values)], record

    @torch.no_grad()
    def prune_round(self) -> SAPRound:
        """Prune by the SAP rule now (earlier masks kept); returns the round's record (layer scope: summed)."""
        values = [t.weight.detach().abs() for t in self.targets]
        kept = [kept_mask(t) for t in self.targets]
        if self.scope == "global":
            chosen, record = self._plan(values, kept)
        else:
            plans = [self._plan([v], [k]) for v, k in zip(values, kept)]
            chosen = [c[0] for c, _ in plans]
            records = [r for _, r in plans]
            record = SAPRound(records[0].index if len(records) == 1 else float("nan"),
                              sum(r.remaining for r in records), sum(r.keep_bound for r in records),
                              sum(r.pruned for r in records), 0.0)
        for target, keep, drop in zip(self.targets, kept, chosen):
            attach_keeping(target, keep & ~drop)
        total = sum(t.weight.numel() for t in self.targets)
        record.density = sum(int(kept_mask(t).sum()) for t in self.targets) / total
        self.rounds_done += 1
        self.densities.append(record.density)
        self.history.append(record)
        return record

    def run(self, rounds: int, train_fn: Any, train_last: bool = False) -> list[float]:
        """`rounds` times: train_fn(model, [self]), prune by the SAP rule, rewind the survivors to theta_k; with
        `train_last`, train the final network too. Returns the densities, one per round after the starting one."""
        rounds = check_step(rounds, "rounds", minimum=1)
        for _ in range(rounds):
            train_fn(self.model, [self])
            self._require_rewind_point()  # before pruning: a failed run leaves the model unpruned
            self.prune_round()
            self.rewind()
        if train_last:
            train_fn(self.model, [self])
        return list(self.densities)

    def on_epoch_end(self, epoch: int) -> None:
        """With prune_every, prune (in place, no rewinding) after every prune_every-th epoch."""
        if self.prune_every is not None and epoch > 0 and epoch % self.prune_every == 0:
            self.prune_round()
