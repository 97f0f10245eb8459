# SPDX-License-Identifier: GPL-2.0-only
"""``python -m cusetpm.rig {fetch,run,shell}``."""

import sys

from .cli import main

sys.exit(main())
