#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
# Debug aid for the real-kernel rig: boot a Debian kernel under qemu with the
# host root (read-only, overlaid by tmpfs) and get a root shell on the serial
# console.  Ctrl-A x kills the guest; `exit` powers it off.
# Usage: rig-shell.sh [6.1|6.12] [--swtpm] [--share DIR]
#   --swtpm  start swtpm --vtpm-proxy first, so the kernel's /dev/tpmrm0 exists
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
version=6.12
case "${1:-}" in 6.*) version=$1; shift ;; esac
cd "$top"
exec "$PYTHON" -m cusetpm.rig shell "$version" "$@"
