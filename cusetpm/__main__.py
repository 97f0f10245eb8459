# SPDX-License-Identifier: GPL-2.0-only
"""``python -m cusetpm`` is the ``cusetpm`` command."""

import sys

from .cli import main

sys.exit(main())
