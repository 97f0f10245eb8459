# SPDX-License-Identifier: GPL-2.0-only
"""Context swapping other than the kernel's (``serve --swap lazy``), on the seam."""

from .lazy import LazySwap

__all__ = ["LazySwap"]
