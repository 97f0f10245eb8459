# SPDX-License-Identifier: GPL-2.0-only
"""A non-editable install (what `pip install .` gives a user) runs the harness and finds its
corpus: the scenarios are package data, not files next to a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_built_install_ships_the_corpus(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert not (target / "cusetpm" / "__editable__").exists()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]))
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    where = run("-c", "import cusetpm; print(cusetpm.__file__)")
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    help_ = run("-m", "cusetpm", "conformance", "--help")
    assert help_.returncode == 0 and "conformance" in help_.stdout, help_.stderr
    count = run(
        "-c",
        "from cusetpm.conformance.scenario import load_scenarios; s = load_scenarios(); "
        "print(len(s), len({x.file for x in s}))",
    )
    n_scenarios, n_files = map(int, count.stdout.split())
    assert n_files == len(list((ROOT / "cusetpm" / "conformance" / "corpus").glob("*.scn"))) == 8
    assert n_scenarios >= 50
