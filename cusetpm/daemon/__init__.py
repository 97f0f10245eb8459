# SPDX-License-Identifier: GPL-2.0-only
"""The daemon on trio: one chip per backing TPM (:mod:`.chip`), any number of nodes on it
(:mod:`.node`).  It imports the kernel port and the backend interface, never a front end."""

from .chip import TpmChip
from .file import DeviceFile, Opener
from .node import Node

__all__ = ["DeviceFile", "Node", "Opener", "TpmChip"]
