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
