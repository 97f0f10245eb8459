# SPDX-License-Identifier: GPL-2.0-only
"""``python -m cusetpm.conformance {run,guest,compare,from-strace}``."""

import sys

from .cli import main

sys.exit(main())
