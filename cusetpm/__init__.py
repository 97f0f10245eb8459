# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm: Linux's /dev/tpmrm0, in user space, over CUSE or FUSE."""

__version__ = "0.1.0"
