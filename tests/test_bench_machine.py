"""Benchmarks say where they ran: prunekit.bench.machine reads the CPU model, cores, memory and versions from the
machine, and no benchmark or harness report carries a machine description written into its source."""

from __future__ import annotations

import ast
import os
import platform
import re
from importlib import metadata
from pathlib import Path

import pytest

from prunekit.bench import machine as M

REPO = Path(__file__).resolve().parents[1]
# Report text is every string constant (f-string pieces included) of the benchmark scripts and the harness.
SOURCES = sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "src" / "prunekit" / "bench").glob("*.py")])
# What a machine description written by hand looks like: a CPU vendor or family, a core count, a memory size.
HARD_CODED = [
    re.compile(r"\b(EPYC|Xeon|Ryzen|Threadripper|Opteron|Graviton|Neoverse|Core\(TM\)|AMD|Intel)\b", re.IGNORECASE),
    re.compile(r"\b\d+[- ](physical |logical )?cores?\b", re.IGNORECASE),
    re.compile(r"\b\d+(\.\d+)? ?GiB( of)? (RAM|memory)\b|\b23\.5 GiB\b", re.IGNORECASE),
]


def string_constants(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant in a Python source, f-string pieces included; docstrings (and other
    bare string statements) are left out: they document the script and reach no report."""
    tree = ast.parse(source)
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare]


def hard_coded(source: str) -> list[str]:
    """The string constants of `source` that describe a machine."""
    return [f"line {line}: {text!r}" for line, text in string_constants(source)
            if any(pattern.search(text) for pattern in HARD_CODED)]


def kernel_field(path: str, name: str) -> str | None:
    """The first `name : value` field of a /proc file, read independently of the module under test."""
    for line in Path(path).read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def test_the_scan_finds_a_machine_written_by_hand():
    """The check can fail: each form the old reports used is caught, the code that reads the machine is not."""
    assert hard_coded('MACHINE = "2-core AMD EPYC, 23.5 GiB, shared with other jobs"')
    assert hard_coded('x = {"machine": "2-core Intel Xeon, 23.5 GiB, shared"}')
    assert hard_coded('line = f"the 2-core machine was busy ({n} runs)"')
    assert hard_coded('line = f"ranks share the same 2 cores; {n} GiB"')
    assert hard_coded('line = f"Machine: {cpu}, 16 GiB RAM"')
    assert not hard_coded('"""Runs in ~2 min on 2 cores."""')  # a docstring reaches no report
    assert not hard_coded('line = f"{describe(info)}; {info[\'cores\']} cores, {ram:.1f} GiB RAM, <= 4 GiB peak"')


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_report_text_is_hard_coded(path):
    assert SOURCES, "no benchmark sources found"
    assert hard_coded(path.read_text(encoding="utf-8")) == []


def test_the_machine_is_read_in_one_place_only():
    """Benchmarks and the harness read the machine through prunekit.bench.machine, never on their own."""
    own_reads = re.compile(r"/proc/(cpuinfo|meminfo)|platform\.processor|os\.cpu_count|SC_PHYS_PAGES")
    helper = REPO / "src" / "prunekit" / "bench" / "machine.py"
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        if path != helper:
            assert not own_reads.search(text), f"{path.relative_to(REPO)} reads the machine itself"
        if any("Machine:" in constant for _, constant in string_constants(text)):
            assert "prunekit.bench.machine" in text or "from .machine import" in text or "machine_sentence" in text, \
                f"{path.relative_to(REPO)} reports a machine without prunekit.bench.machine"


def test_cpu_model_is_the_kernels_model_name():
    if not Path("/proc/cpuinfo").is_file() or kernel_field("/proc/cpuinfo", "model name") is None:
        pytest.skip("no 'model name' in /proc/cpuinfo on this machine")
    info = M.machine_info()
    assert info["cpu"] == M.cpu_model() == kernel_field("/proc/cpuinfo", "model name")
    assert M.describe(info).startswith(f"{info['cpu']}, {info['cores']} cores, ")


def test_cores_memory_and_versions_are_the_machines():
    info = M.machine_info()
    assert info["cores"] == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if Path("/proc/meminfo").is_file():
        total_kib = int(kernel_field("/proc/meminfo", "MemTotal").split()[0])
        assert info["ram_gib"] == total_kib / 2**20
        assert f"{total_kib / 2**20:.1f} GiB RAM" in M.describe(info)
    assert info["python"] == platform.python_version()
    for package in ("torch", "transformers", "prunekit"):
        assert info["versions"][package] == metadata.version(package)
        assert f"{package} {metadata.version(package)}" in M.software(info)


def test_cpu_model_reads_the_model_name_field(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Example\nmodel name\t: Example CPU 9000 @ 3.00GHz\n\n"
                       "processor\t: 1\nmodel name\t: Example CPU 9000 @ 3.00GHz\n")
    assert M.cpu_model(cpuinfo) == "Example CPU 9000 @ 3.00GHz"
    cpuinfo.write_text("processor\t: 0\nCPU part\t: 0xd0c\n")  # no model name (some ARM kernels): platform's word
    assert M.cpu_model(cpuinfo) == (platform.processor() or platform.machine() or "unknown CPU")
    assert M.cpu_model(tmp_path / "missing") == M.cpu_model(cpuinfo)


def test_describe_all_keeps_distinct_machines_and_counts_unrecorded_results():
    a = {"cpu": "CPU A", "cores": 2, "ram_gib": 8.0, "load_1min": 0.5, "python": "3.11.7",
         "versions": {"torch": "2.13.0"}, "commit": "abc"}
    b = {**a, "cpu": "CPU B", "load_1min": 3.0}
    text = M.describe_all([a, {**a, "load_1min": 1.5, "commit": "def"}, b, None, None])
    assert text == ("CPU A, 2 cores, 8.0 GiB RAM (Python 3.11.7, torch 2.13.0); "
                    "CPU B, 2 cores, 8.0 GiB RAM (Python 3.11.7, torch 2.13.0); not recorded for 2 of the results")
    assert M.describe_all([]) == "not recorded"
