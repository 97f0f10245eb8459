# SPDX-License-Identifier: GPL-2.0-only
"""An example project's tests, run against kernel RM semantics with no TPM and no root.

With cusetpm installed, the ``cusetpm_node`` fixture is there: no conftest needed.
"""

import os
import subprocess

import pytest


def tpm(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def test_random_bytes(cusetpm_node):
    """tpm2-tools find the node through TPM2TOOLS_TCTI, which the fixture sets."""
    assert os.environ["TPM2TOOLS_TCTI"] == cusetpm_node.tcti
    assert len(tpm("tpm2_getrandom", "--hex", "16").strip()) == 32


@pytest.mark.cusetpm(kernel="all")
def test_a_saved_primary_key_loads_again_on_every_kernel(cusetpm_node, tmp_path):
    """Runs once per kernel profile: the key's context outlives the tool that made it."""
    tpm("tpm2_createprimary", "-c", str(tmp_path / "p.ctx"))
    assert "name:" in tpm("tpm2_readpublic", "-c", str(tmp_path / "p.ctx"))


def test_one_node_for_the_session(cusetpm_session_node):
    assert os.path.exists(cusetpm_session_node.path)
