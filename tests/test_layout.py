# SPDX-License-Identifier: GPL-2.0-only
"""The layers and what may import what (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cusetpm.testing.daemon import unmount

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cusetpm"


def modules(folder: str = "") -> list[Path]:
    return sorted((PKG / folder).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports, relative imports resolved."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
            elif node.module:
                out.add(node.module)
    return out


def cusetpm_imports(path: Path) -> set[str]:
    return {n for n in imports(path) if n == "cusetpm" or n.startswith("cusetpm.")}


def test_the_kernel_port_imports_nothing_else_of_cusetpm_nor_io_libraries():
    for path in modules("kernel"):
        names = imports(path)
        outside = {n for n in cusetpm_imports(path) if not n.startswith("cusetpm.kernel")}
        assert not outside, f"{path.name} imports {outside}"
        assert not {n.split(".")[0] for n in names} & {"trio", "pyfuse3", "socket", "subprocess"}, path.name


@pytest.mark.parametrize("a,b", [("frontends", "backends"), ("backends", "frontends"), ("backends", "daemon")])
def test_layers_that_must_not_meet(a, b):
    for path in modules(a):
        bad = {n for n in cusetpm_imports(path) if n.startswith(f"cusetpm.{b}")}
        assert not bad, f"{a}/{path.name} imports {bad}"


def test_the_daemon_imports_no_front_end():
    for path in modules("daemon"):
        assert not {n for n in cusetpm_imports(path) if n.startswith("cusetpm.frontends")}, path.name


def test_only_the_harness_and_tests_use_the_test_support():
    for path in modules():
        part = path.relative_to(PKG).parts[0]
        if part in ("testing", "conformance", "rig"):
            continue
        assert not {n for n in cusetpm_imports(path) if n.startswith("cusetpm.testing")}, path


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in [*modules(), *(ROOT / "scripts").rglob("*.py")]
        if (n := len(p.read_text().splitlines())) > 520
    }
    assert not long


def test_the_readme_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    missing = [
        str(p.relative_to(PKG))
        for p in modules()
        if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(PKG)) not in readme
    ]
    assert not missing


def test_serve_loads_neither_the_conformance_harness_nor_the_rig(tmp_path):
    """Run the real daemon with -X importtime: every module it imported is on stderr."""
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "cusetpm", "serve", "--fuse", str(tmp_path / "mnt"),
         "--state-dir", str(tmp_path / "state"), "--ready-fd", str(w)],
        cwd=ROOT, pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r) as ready:
            node = ready.readline().strip()
        assert node == str(tmp_path / "mnt" / "tpmrm0")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        unmount(tmp_path / "mnt")  # only if the daemon could not
    assert proc.returncode == 0, err[-2000:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "cusetpm.daemon.node" in loaded and "cusetpm.frontends.fuse" in loaded
    heavy = {m for m in loaded if m.startswith("cusetpm.rig") or m.startswith("cusetpm.testing")}
    heavy |= {m for m in loaded if m.startswith("cusetpm.conformance.") and m != "cusetpm.conformance.cli"}
    assert not heavy
