# SPDX-License-Identifier: GPL-2.0-only
"""The pytest plugin (cusetpm.testing.pytest_plugin), run on the example project in examples/
through pytester, as a user's own suite would run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pytest-kernel-semantics"


def test_the_example_project_passes_on_every_profile(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_my_tool=(EXAMPLE / "test_my_tool.py").read_text())
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "*test_random_bytes?kernel-6.12? PASSED*",
            "*test_a_saved_primary_key_loads_again_on_every_kernel?kernel-6.1? PASSED*",
            "*test_a_saved_primary_key_loads_again_on_every_kernel?kernel-6.12? PASSED*",
        ]
    )


def test_the_marker_reaches_the_daemon_and_the_environment_is_restored(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.cusetpm(kernel="6.1")
        def test_inside(cusetpm_node):
            assert cusetpm_node.kernel == "6.1"
            assert os.environ["CUSETPM_DEVICE"] == cusetpm_node.path
            log = open(os.path.join(os.path.dirname(os.path.dirname(cusetpm_node.path)), "daemon.log")).read()
            assert "kernel 6.1)" in log

        def test_after():
            assert "CUSETPM_DEVICE" not in os.environ
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_an_unknown_kernel_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.cusetpm(kernel="5.4")
        def test_x(cusetpm_node):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    assert "unknown kernel ['5.4']" in result.stdout.str() + result.stderr.str()
