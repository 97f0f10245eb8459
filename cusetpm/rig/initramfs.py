# SPDX-License-Identifier: GPL-2.0-only
"""The guest's initramfs: static busybox, the modules it needs (decompressed) and its /init."""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

from .kernels import KernelFiles, RigError, _modname, _which, module_load_order

__all__ = ["build_initramfs"]

_MSIZE = 512000  # virtio transport maximum
_SENTINEL = "CUSETPM-RIG"


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed (busybox insmod can't read .ko.xz/.zst)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run([_which("zstd"), "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def _busybox() -> Path:
    """The static busybox (a dynamic one would not run inside the initramfs)."""
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file() and _is_static_elf(p):
            return p
    found = shutil.which("busybox")
    if found and _is_static_elf(Path(found)):
        return Path(found)
    raise RigError("rig: a statically linked busybox is required (Debian package busybox-static)")


def _is_static_elf(path: Path) -> bool:
    """True if an ELF64 file has no PT_INTERP (i.e. needs no dynamic loader)."""
    with open(path, "rb") as fh:
        hdr = fh.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff = int.from_bytes(hdr[32:40], "little")
        phentsize = int.from_bytes(hdr[54:56], "little")
        phnum = int.from_bytes(hdr[56:58], "little")
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    return all(int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") != 3 for i in range(phnum))


class _Cpio:
    """Minimal newc writer: lets us add /dev/console without being root."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + nameb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# The init runs from the initramfs with busybox; everything host-specific
# (share mounts, the command) arrives through the rigctl 9p share.
_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /ctl /lower /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "@SENT@-FAIL: $*"; sync; poweroff -f; sleep 60; }
while read -r m; do insmod "/modules/$m" || fail "insmod $m"; done < /modules.list
O9P="trans=virtio,version=9p2000.L,msize=@MSIZE@"
mount -t 9p -o "$O9P,cache=none" rigctl /ctl || fail "mount rigctl"
mount -t 9p -o "$O9P,ro,cache=loose" hostroot /lower || fail "mount hostroot"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "mount overlay"
mount -t proc proc /newroot/proc || fail "mount proc"
mount -t sysfs sysfs /newroot/sys || fail "mount sys"
mount -t devtmpfs devtmpfs /newroot/dev || fail "mount dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm || fail "mount shm"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "mount run"
ip link set lo up || fail "lo up"
. /ctl/setup.sh
cp /ctl/cmd.sh /newroot/run/cusetpm-rig-cmd.sh || fail "copy cmd"
echo "@SENT@-BEGIN $RIG_NONCE"
if [ "$RIG_INTERACTIVE" = 1 ]; then
  setsid cttyhack chroot /newroot /bin/sh /run/cusetpm-rig-cmd.sh
  rc=$?
else
  chroot /newroot /bin/sh /run/cusetpm-rig-cmd.sh </dev/null >/ctl/output 2>&1
  rc=$?
fi
echo "$RIG_NONCE $rc" > /ctl/rc.tmp && mv /ctl/rc.tmp /ctl/rc
echo "@SENT@-END $RIG_NONCE rc=$rc"
sync
poweroff -f
sleep 60
"""


def build_initramfs(kernel: KernelFiles) -> bytes:
    """A cpio archive with static busybox, the needed modules and our /init."""
    cpio = _Cpio()
    for d in ("bin", "dev", "modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", _busybox().read_bytes(), 0o755)
    names = []
    for rel in module_load_order(kernel):
        name = _modname(rel) + ".ko"
        cpio.file(f"modules/{name}", _read_module(kernel.modules_dir / rel))
        names.append(name)
    cpio.file("modules.list", ("\n".join(names) + "\n").encode())
    init = _INIT.replace("@SENT@", _SENTINEL).replace("@MSIZE@", str(_MSIZE))
    cpio.file("init", init.encode(), 0o755)
    return cpio.finish()
