"""Where a benchmark ran, read from the machine it runs on: CPU model, cores, memory, load, software versions, commit.

Every benchmark report (benchmarks/*.py and `prunekit bench`) states its machine through this module, so no report
carries a machine description written by hand.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "prunekit")
CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")
# The checkout prunekit runs from when installed editable (src/prunekit/bench/machine.py -> repository root).
REPO = Path(__file__).resolve().parents[3]


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU model as the kernel names it ('model name' in /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.split(":", 1)[0].strip() == "model name":
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def core_count() -> int:
    """Cores this process may run on (its CPU affinity), which is what a benchmark can use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_gib(meminfo: Path = MEMINFO) -> float | None:
    """Total memory in GiB (MemTotal of /proc/meminfo); None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of `packages` (from their metadata, nothing imported); missing ones are left out."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_commit(repo: Path = REPO) -> str | None:
    """Short commit of the checkout prunekit runs from, flagged when src/ has uncommitted changes; None outside git."""
    if not (repo / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=repo, capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} (with uncommitted changes under src/)" if commit and dirty else commit


def machine_info(packages: Iterable[str] = PACKAGES) -> dict[str, Any]:
    """The machine and software, as a JSON-ready dict (the keys benchmark result files store under "machine")."""
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"cpu": cpu_model(), "cores": core_count(), "ram_gib": memory_gib(), "load_1min": load,
            "python": platform.python_version(), "versions": versions(packages), "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def describe(info: Mapping[str, Any] | None = None) -> str:
    """One line about the hardware: CPU model, cores, memory, and the load when the run started."""
    info = machine_info() if info is None else info
    ram = f"{info['ram_gib']:.1f} GiB RAM" if info.get("ram_gib") else "RAM unknown"
    load = info.get("load_1min")
    busy = f", load average {load:.1f} at the start" if isinstance(load, (int, float)) else ""
    return f"{info.get('cpu') or 'unknown CPU'}, {info.get('cores')} cores, {ram}{busy}"


def software(info: Mapping[str, Any] | None = None) -> str:
    """One line about the software: Python, the packages' versions, and the prunekit commit when known."""
    info = machine_info() if info is None else info
    parts = [f"Python {info.get('python')}"] + [f"{name} {v}" for name, v in (info.get("versions") or {}).items()]
    if info.get("commit"):
        parts.append(f"commit {info['commit']}")
    return ", ".join(parts)


def describe_all(infos: Iterable[Mapping[str, Any] | None]) -> str:
    """The distinct machines (with software) of several runs; runs that recorded none are counted as such."""
    lines, unknown = [], 0
    for info in infos:
        if not info:
            unknown += 1
            continue
        # The load and the commit differ from run to run; the machine and the software versions do not.
        line = f"{describe({**info, 'load_1min': None})} ({software({**info, 'commit': None})})"
        if line not in lines:
            lines.append(line)
    if unknown:
        lines.append(f"not recorded for {unknown} of the results")
    return "; ".join(lines) or "not recorded"


__all__ = ["machine_info", "describe", "software", "describe_all", "cpu_model", "core_count", "memory_gib",
           "versions", "git_commit"]
