# SPDX-License-Identifier: GPL-2.0-only
"""The FUSE front end's own rules (the node's behaviour is tested through it elsewhere)."""
import errno

import pyfuse3
import pytest
import trio

from cusetpm.frontends.fuse import errno_reply


def test_handler_errors_become_errnos_and_never_escape():
    @errno_reply
    async def raises(exc: BaseException) -> None:
        raise exc

    for exc, code in ((OSError(errno.EBUSY, "busy"), errno.EBUSY), (ValueError("bug"), errno.EIO),
                      (pyfuse3.FUSEError(errno.ENOENT), errno.ENOENT)):  # fmt: skip
        with pytest.raises(pyfuse3.FUSEError) as got:
            trio.run(raises, exc)
        assert got.value.errno == code
