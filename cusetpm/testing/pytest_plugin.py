# SPDX-License-Identifier: GPL-2.0-only
"""A pytest plugin: run a project's own tests against kernel RM semantics.

Installed with the package (entry point ``pytest11``), so two lines of conftest are not even
needed. A test asks for a node:

    def test_my_program(cusetpm_node):            # a fresh node for this test
        subprocess.run(["my-program"], check=True)  # TPM2TOOLS_TCTI etc. point at it

    @pytest.mark.cusetpm(kernel="6.1")            # one profile
    @pytest.mark.cusetpm(kernel="all")            # every profile: the test runs once per kernel

``cusetpm_session_node`` is one node for the whole session (``--cusetpm-kernel``, default
6.12). Both set ``TPM2TOOLS_TCTI``, ``TPM2OPENSSL_TCTI``, ``TPM2_PKCS11_TCTI``, ``TCTI`` and
``CUSETPM_DEVICE`` while they are in use, and give a :class:`CusetpmNode`.  Each node is a
``cusetpm serve --fuse`` daemon with its own fresh swtpm.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV_NAMES = ("TPM2TOOLS_TCTI", "TPM2OPENSSL_TCTI", "TPM2_PKCS11_TCTI", "TCTI")


@dataclass(frozen=True)
class CusetpmNode:
    """A served node: its path, the kernel profile it reproduces, and the TCTI string."""

    path: str
    kernel: str

    @property
    def tcti(self) -> str:
        return f"device:{self.path}"

    @property
    def env(self) -> dict[str, str]:
        return {**{name: self.tcti for name in ENV_NAMES}, "CUSETPM_DEVICE": self.path}


def _profiles() -> list[str]:
    from cusetpm.kernel.profiles import PROFILES

    return list(PROFILES)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cusetpm")
    group.addoption("--cusetpm-kernel", default=None, help="kernel profile of cusetpm_session_node (default 6.12)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", 'cusetpm(kernel="6.12"|"6.1"|"all"): kernel profile(s) of the cusetpm_node fixture'
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cusetpm_node" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("cusetpm")
    kernel = marker.kwargs.get("kernel") if marker else None
    if kernel is None:
        from cusetpm.kernel.profiles import DEFAULT_PROFILE

        kernels = [DEFAULT_PROFILE]
    elif kernel == "all":
        kernels = _profiles()
    else:
        kernels = [kernel] if isinstance(kernel, str) else list(kernel)
    unknown = set(kernels) - set(_profiles())
    if unknown:
        raise pytest.UsageError(f"cusetpm marker: unknown kernel {sorted(unknown)}; choose from {_profiles()} or 'all'")
    metafunc.parametrize("cusetpm_kernel", kernels, ids=[f"kernel-{k}" for k in kernels], scope="function")


def _serve(kernel: str, where: Path) -> Iterator[CusetpmNode]:
    from cusetpm.testing.daemon import start_serve

    mnt = where / "mnt"
    served = start_serve(
        ["--fuse", str(mnt), "--kernel", kernel, "--state-dir", str(where / "swtpm")],
        log_path=where / "daemon.log",
        mount=mnt,
    )
    node = CusetpmNode(str(served.node), kernel)
    saved = {name: os.environ.get(name) for name in node.env}
    os.environ.update(node.env)
    try:
        yield node
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        served.stop()


@pytest.fixture
def cusetpm_node(cusetpm_kernel: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CusetpmNode]:
    """A fresh node for one test, with the kernel profile of its ``cusetpm`` marker."""
    yield from _serve(cusetpm_kernel, tmp_path_factory.mktemp("cusetpm"))


@pytest.fixture(scope="session")
def cusetpm_session_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CusetpmNode]:
    """One node for the whole session (``--cusetpm-kernel``, default 6.12)."""
    from cusetpm.kernel.profiles import DEFAULT_PROFILE

    kernel = request.config.getoption("--cusetpm-kernel") or DEFAULT_PROFILE
    yield from _serve(kernel, tmp_path_factory.mktemp("cusetpm-session"))
