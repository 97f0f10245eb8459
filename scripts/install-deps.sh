#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
# Install the Debian packages cusetpm needs, only those missing.  Needs root (or sudo).
set -eu
PKGS="python3 python3-venv python3-dev gcc pkg-config
      libfuse3-dev fuse3 libtss2-dev
      swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 dbus
      qemu-system-x86 busybox-static cpio kmod xz-utils strace tshark
      tpm2-openssl bubblewrap"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing:$missing"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
