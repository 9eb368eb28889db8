"""The one writer of BENCHMARKS.md sections: each benchmark script owns the text between its two marker comments."""

from __future__ import annotations

import os
from pathlib import Path


def replace_marked_block(path: Path, start: str, end: str, block: str, top: str = "# prunekit benchmarks\n") -> None:
    """Put `block` (which begins with `start` and ends with `end`) where the old block was, or append it; the rest
    of the file stays as it is. Written to a temporary file, then renamed, so a reader never sees half a file."""
    current = path.read_text(encoding="utf-8") if path.is_file() else top
    block = block.strip("\n") + "\n"
    first, last = current.find(start), current.find(end)
    if first != -1 and last > first:
        tail = current[last + len(end):].lstrip("\n")
        new = current[:first] + block + ("\n" + tail if tail else "")
    else:
        new = current.rstrip("\n") + "\n\n" + block
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(new, encoding="utf-8")
    os.replace(temp, path)
