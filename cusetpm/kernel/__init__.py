# SPDX-License-Identifier: GPL-2.0-only
"""The faithful port of Linux's TPM resource manager (drivers/char/tpm/), sans-I/O.

Bytes in, TPM commands and responses out: no trio, no FUSE, and no import of anything else
of cusetpm (a test checks).  Read in this order: ``wire`` (constants), ``request`` (what the
core asks of its driver), ``profiles`` (where kernels differ), ``structs`` (struct tpm_chip,
struct tpm_space), ``tpm_interface``, ``tpm2_cmd``, ``tpm2_space``, ``seam``,
``tpm_dev_common``.  docs/kernel-rules.md says which kernel rule each follows.
"""
