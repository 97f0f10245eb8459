# SPDX-License-Identifier: GPL-2.0-only
"""Real-kernel rig: boot Debian's own kernels under qemu and run a command.

Why: the only trustworthy reference for /dev/tpmrm0 semantics is the real
kernel resource manager.  This module downloads Debian's kernel packages
(no install: ``apt-get download`` + ``dpkg -x`` into a cache), builds a tiny
busybox initramfs, boots the kernel under qemu (TCG, no KVM needed) and runs
a shell command as root inside a chroot of the *host's own root file system*,
so host binaries (swtpm, tpm2-tools, Python venvs) run unchanged in the guest.

Guest layout:

* host ``/`` is exported read-only over virtio-9p and used as the lower layer
  of an overlayfs whose upper layer is a guest tmpfs: the whole tree (also
  /tmp, /root, the repo) looks as on the host and is writable, but writes stay
  in the guest and vanish at power-off;
* fresh ``/proc``, ``/sys``, ``/dev`` (devtmpfs), ``/dev/pts``, ``/dev/shm``
  and ``/run`` (tmpfs); ``lo`` is up, there is no other network;
* a private read-write 9p share carries the command in and its output and
  exit status out (never parsed from the serial console, so kernel log noise
  cannot corrupt results);
* ``share=DIR`` mounts a host directory read-write at the same path.

Debugging: ``python -m cusetpm.rig run 6.12 --swtpm --console 'CMD'`` or
``scripts/rig-shell.sh 6.12 --swtpm`` for an interactive root shell.

Required Debian packages: qemu-system-x86 (qemu-system-x86_64, SeaBIOS and
the option ROMs come with it), busybox-static, kmod (depmod), apt and dpkg.
The guest-side helpers additionally need swtpm and tpm2-tools.

The parts: :mod:`.kernels` (the kernel cache: apt, download, extract, module order),
:mod:`.initramfs` (busybox and the /init), :mod:`.qemu` (boot and run), :mod:`.prelude`
(shell text for the guest), :mod:`.cli` (``python -m cusetpm.rig``).
"""

from __future__ import annotations

from .initramfs import build_initramfs
from .kernels import GUEST_MODULES, KERNELS, KernelFiles, RigError, cache_dir, ensure_kernel, module_load_order
from .prelude import guest_swtpm_prelude
from .qemu import BOOT_ATTEMPTS, GuestResult, run_in_guest, run_interactive

__all__ = [
    "BOOT_ATTEMPTS",
    "KERNELS",
    "GuestResult",
    "KernelFiles",
    "RigError",
    "cache_dir",
    "ensure_kernel",
    "run_in_guest",
    "guest_swtpm_prelude",
    "GUEST_MODULES",
    "module_load_order",
    "build_initramfs",
    "run_interactive",
]
