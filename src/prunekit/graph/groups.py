"""Groups of coupled structures: the unit of structured pruning.

A *unit* is the smallest thing that can be removed on its own: one channel of a conv chain, one attention head,
one MLP neuron, one slot of the hidden size. Removing a unit deletes a set of slices from several tensors at once
(a conv's output rows, the BatchNorm entries, the next conv's input columns, ...). A *group* gathers the units
that touch the same tensors, so that they can be scored against each other and given one width.

Each `Member` lists, for one tensor dimension, which tensor indices belong to which unit (`index[i]` belongs to
unit `unit[i]`). This flat form covers every coupling the tracer and the transformers adapter produce: one index
per unit (plain channels), head_dim indices per unit (heads), H*W indices per unit (flatten -> linear), strided
indices (grouped convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# What a member's slice is to its module: rows that produce the unit ("out"), columns that consume it ("in"),
# per-channel parameters of a normalisation or a learned embedding ("norm"). Scores use it: BN scale reads "norm",
# FPGM reads "out".
ROLES = ("out", "in", "norm")

# A member whose `param` starts with this names an int attribute of the module (e.g. "attribute:num_heads") that a
# reshape or view reads as a size: removing units lowers it by one per removed index, as it would a tensor's size.
ATTRIBUTE = "attribute:"


@dataclass(frozen=True)
class Member:
    """The slices of one tensor dimension that belong to a group's units."""

    module: str  # qualified module name ("" for the root)
    param: str  # parameter or buffer name on that module, e.g. "weight", "running_mean", "in_proj_weight"
    dim: int  # the tensor dimension sliced (non-negative)
    index: torch.Tensor  # LongTensor [n]: indices along `dim`
    unit: torch.Tensor  # LongTensor [n]: the unit (0 .. group.size - 1) each index belongs to
    role: str = "out"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.module, self.param, self.dim)


@dataclass
class Group:
    """Units that are scored against each other and pruned to one width."""

    name: str  # readable chain of the modules it runs through, e.g. "layer1.0.conv1 -> layer1.0.bn1 -> layer1.0.conv2"
    kind: str  # "channel", "head", "kv-group", "neuron", "hidden"
    size: int  # number of units
    members: list[Member]
    min_keep: int = 1  # never keep fewer units than this
    notes: list[str] = field(default_factory=list)
    attributes: list[Member] = field(default_factory=list)  # size attributes read by reshapes (param ATTRIBUTE+name)
    kept_whole: str = ""  # why no unit may be removed (a shape constant the tracer could not tie to an attribute)

    def modules(self) -> list[str]:
        """Names of the modules this group touches, in first-seen order."""
        seen: dict[str, None] = {}
        for member in self.members:
            seen.setdefault(member.module, None)
        return list(seen)

    def removed_indices(self, removed_units: torch.Tensor) -> dict[tuple[str, str, int], torch.Tensor]:
        """Tensor indices to delete, per (module, param, dim), when `removed_units` go."""
        result: dict[tuple[str, str, int], torch.Tensor] = {}
        for member in [*self.members, *self.attributes]:
            hit = torch.isin(member.unit, removed_units)
            if hit.any():
                previous = result.get(member.key)
                chosen = member.index[hit]
                result[member.key] = chosen if previous is None else torch.cat([previous, chosen])
        return result


@dataclass
class Barrier:
    """Something the tracer did not understand: nothing is pruned through it."""

    where: str  # node or module name
    reason: str


@dataclass
class DependencyGraph:
    """Everything structured pruning needs to know about one model."""

    groups: list[Group]
    barriers: list[Barrier] = field(default_factory=list)
    frozen_units: int = 0  # units that exist but must not be removed (model inputs/outputs, barriers)

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def describe(self) -> str:
        """A readable listing: one line per group, then the barriers."""
        lines = [f"{len(self.groups)} prunable groups"]
        for group in self.groups:
            lines.append(f"  [{group.kind} x{group.size}] {group.name}")
            if group.kept_whole:
                lines.append(f"    kept whole: {group.kept_whole}")
        if self.barriers:
            lines.append(f"{len(self.barriers)} barriers (nothing pruned through them):")
            lines += [f"  {b.where}: {b.reason}" for b in self.barriers]
        return "\n".join(lines)
