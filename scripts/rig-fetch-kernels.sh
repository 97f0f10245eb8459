#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
# Prefetch the Debian kernels used by the real-kernel rig (cusetpm/rig/) into
# its cache (~/.cache/cusetpm/kernels, or $CUSETPM_RIG_CACHE), so the first test
# boot does not pay for the download.  Usage: rig-fetch-kernels.sh [6.1] [6.12]
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
cd "$top"
exec "$PYTHON" -m cusetpm.rig fetch "$@"
