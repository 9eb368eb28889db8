"""Intra-op thread count for a stretch of work, restored afterwards (beside core: no model knowledge)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the body with `count` intra-op threads (None: as they are), then restore the caller's setting.

    For many small operations (tiny batches, SparseGPT's per-column steps) thread hand-offs cost more than they
    save, most of all on a busy machine.
    """
    before = torch.get_num_threads()
    change = count is not None and count != before
    if change:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(before)
