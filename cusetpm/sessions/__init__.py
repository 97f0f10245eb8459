# SPDX-License-Identifier: GPL-2.0-only
"""Global session accounting (``cusetpm serve --sessions global``), opt-in.

The seed thread's unmerged RFC, built on the seam: one registry of every session the TPM
holds for this daemon (:mod:`.registry`), and the seam that keeps it exact and acts on it
(:mod:`.global_seam`): admission, eviction, fair waiting, tombstones, isolation.  Sans-I/O
like the port: it imports only :mod:`cusetpm.kernel`.
"""

from .global_seam import GlobalSessions
from .settings import Settings

__all__ = ["GlobalSessions", "Settings"]
