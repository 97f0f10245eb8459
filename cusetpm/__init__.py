# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm: a user-space, kernel-faithful /dev/tpmrm0 over CUSE or FUSE.

Layers (docs/architecture.md): ``kernel`` (the sans-I/O port), ``backends`` (where commands
go), ``daemon`` (the chip and its nodes on trio), ``frontends`` (CUSE and FUSE), ``cli``;
``conformance`` and ``rig`` prove it against the real kernels.
"""

__version__ = "0.1.0"
