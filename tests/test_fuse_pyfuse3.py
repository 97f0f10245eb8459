# SPDX-License-Identifier: GPL-2.0-only
"""The pyfuse3 FUSE front end (``--fuse-lib pyfuse3``): its error rule, and tpm2-tools through it."""

import errno
import os
import subprocess

import pyfuse3
import pytest
import trio

from cusetpm.frontends.fuse_pyfuse3 import errno_reply


def test_handler_errors_become_errnos_and_never_escape():
    @errno_reply
    async def raises(exc: BaseException) -> None:
        raise exc

    for exc, code in ((OSError(errno.EBUSY, "busy"), errno.EBUSY), (ValueError("bug"), errno.EIO),
                      (pyfuse3.FUSEError(errno.ENOENT), errno.ENOENT)):  # fmt: skip
        with pytest.raises(pyfuse3.FUSEError) as got:
            trio.run(raises, exc)
        assert got.value.errno == code


def test_tpm2_tools_work_through_the_pyfuse3_directory(tmp_path):
    """The library the design names still serves a working node: a primary key made, read
    back and flushed by tpm2-tools, through ``--fuse-lib pyfuse3``."""
    from cusetpm.testing.daemon import start_serve, unmount

    mnt = tmp_path / "mnt"
    daemon = start_serve(["--fuse", str(mnt), "--fuse-lib", "pyfuse3", "--state-dir", str(tmp_path / "state")],
                         log_path=tmp_path / "log", mount=mnt)  # fmt: skip
    env = dict(os.environ, TPM2TOOLS_TCTI=f"device:{mnt / 'tpmrm0'}")
    try:
        ctx = tmp_path / "primary.ctx"
        for argv in (["tpm2_createprimary", "-Q", "-c", str(ctx)], ["tpm2_readpublic", "-Q", "-c", str(ctx)],
                     ["tpm2_getcap", "handles-transient"]):  # fmt: skip
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        # The primary was the tool's file's; closing it flushed it, as on the kernel's node.
        assert done.stdout.strip() == ""
        assert "(FUSE, kernel 6.12, pyfuse3)" in daemon.log()
        assert daemon.stop() == 0
    finally:
        unmount(mnt)


def _main_dies(tmp: str) -> None:
    """Serve a node with ``--fuse-lib pyfuse3`` whose loop fails at once (run in a child, so
    that a hang is a timeout); print how serve_fuse ended."""
    import pathlib

    from test_fuse import serve_one_node

    from cusetpm.frontends import fuse_pyfuse3

    class Bug(RuntimeError):
        pass

    async def broken_main(*args: object) -> None:
        raise Bug("a bug in the request loop")

    fuse_pyfuse3.pyfuse3.main = broken_main  # type: ignore[assignment]

    async def body(node: object) -> None:
        raise AssertionError("serve_fuse started")

    try:
        serve_one_node(pathlib.Path(tmp), body, serve_fuse=fuse_pyfuse3.serve_fuse)
    except BaseExceptionGroup as failed:
        print("serve_fuse:", "Bug" if failed.subgroup(Bug) else repr(failed), flush=True)


def test_a_loop_that_dies_while_the_node_starts_ends_serve_fuse_with_its_error(tmp_path):
    """pyfuse3's loop failing before the mount check answered ends serve_fuse with that error
    and leaves no mount, instead of hanging in the check's stat."""
    import sys

    from cusetpm.testing.daemon import unmount

    code = f"import test_fuse_pyfuse3; test_fuse_pyfuse3._main_dies({str(tmp_path)!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    finally:
        unmount(tmp_path / "mnt")  # what a hang, killed, would leave
    assert done.stdout.splitlines() == ["serve_fuse: Bug"], done.stderr[-2000:]
    with open("/proc/self/mounts") as mounts:
        assert str(tmp_path / "mnt") not in mounts.read()
