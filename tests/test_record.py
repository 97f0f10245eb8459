# SPDX-License-Identifier: GPL-2.0-only
"""``cusetpm record`` and ``cusetpm check`` with unmodified tpm2-tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cusetpm.conformance.scenario import parse_text

ROOT = Path(__file__).resolve().parent.parent


def cusetpm(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cusetpm", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_record_writes_what_the_program_did_and_passes_its_status_through(tmp_path):
    out = tmp_path / "p.scn"
    script = "tpm2_createprimary -c p.ctx >/dev/null && tpm2_getrandom 4 >/dev/null && exit 3"
    r = cusetpm("record", "-o", str(out), "--", "sh", "-c", script, cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    (sc,) = parse_text(out.read_text())
    ops = [s.text.split()[0] for s in sc.steps]
    assert ops.count("open") == ops.count("close") >= 2  # two tools, each its own file
    writes = [s.text for s in sc.steps if s.text.startswith("write")]
    assert any(w.split()[2].replace(" ", "")[12:20] == "00000131" for w in writes)  # CreatePrimary
    assert any(w.split()[2][12:20] == "0000017b" for w in writes)  # GetRandom


def test_record_points_every_tcti_variable_at_the_node(tmp_path):
    r = cusetpm("record", "--", "sh", "-c", 'echo "$TPM2TOOLS_TCTI $TPM2OPENSSL_TCTI $CUSETPM_DEVICE"', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tools, openssl, device = r.stderr.split()  # the program's stdout goes to stderr
    assert tools == openssl == f"device:{device}" and device.endswith("/tpmrm0")
    assert r.stdout.splitlines()[1] == "scenario sh" and len(r.stdout.splitlines()) == 2  # no calls


def test_record_of_a_missing_program_is_127(tmp_path):
    assert cusetpm("record", "--", "no-such-program-here", cwd=tmp_path).returncode == 127


@pytest.mark.guest
def test_check_finds_tpm2_tools_identical_on_both_kernels(tmp_path):
    script = (
        "tpm2_createprimary -c p.ctx && tpm2_create -C p.ctx -u k.pub -r k.priv && "
        "tpm2_startauthsession -S s.ctx --policy-session && tpm2_policypcr -S s.ctx -l sha256:0 && "
        "tpm2_flushcontext s.ctx"
    )
    r = cusetpm("check", "--kernel", "all", "--", "sh", "-c", script, cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 scenarios identical, 0 differ" in r.stdout
