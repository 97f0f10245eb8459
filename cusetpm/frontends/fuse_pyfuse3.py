# SPDX-License-Identifier: GPL-2.0-only
"""FUSE front end: ``DIR/tpmrm0`` as a file whose every open() is a new TPM space.

For kernels without CUSE.  pyfuse3 serves one directory holding one file per node; opens are direct
I/O and non-seekable (pread/pwrite give ESPIPE), and poll is answered with wake-ups, so
tpm2-tss's device TCTI works on it unchanged.  Differences from a character device, which
FUSE decides before we see the call: write(fd, buf, 0) and read(fd, buf, 0) return 0, O_NONBLOCK
is taken from open() (FUSE does not pass fcntl(F_SETFL) changes to pyfuse3's write handler),
and writev() is one write.  ioctl gives ENOTTY as on the kernel's node: pyfuse3 has no ioctl
handler, so libfuse answers ENOSYS and the kernel turns that into ENOTTY.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from typing import Any, Callable, Coroutine, ParamSpec, TypeVar

import pyfuse3
import trio

from ..daemon.file import DeviceFile, Opener
from ..daemon.node import Node
from .fuse import Directory, unmount_dead

log = logging.getLogger(__name__)


T = TypeVar("T")
P = ParamSpec("P")


def errno_reply(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Answer a handler's OSError with its errno, and any other exception with EIO.

    pyfuse3 lets anything but FUSEError escape and stop the whole file system; one bad
    request must never take the daemon down.
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("FUSE %s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class TpmFuse(pyfuse3.Operations, Directory):
    """pyfuse3 operations for a directory of TPM device files, one per node."""

    enable_writeback_cache = False

    def __init__(
        self, node: Node | None = None, name: str = "tpmrm0", mode: int = 0o660, owner: int | None = None,
        group: int | None = None,
    ) -> None:  # fmt: skip
        pyfuse3.Operations.__init__(self)
        Directory.__init__(self)
        self.files: dict[int, tuple[DeviceFile, bool]] = {}
        self._next_fh = 1
        if node is not None:
            self.add(node, name, mode, owner, group)

    def invalidate_attrs(self, inode: int) -> None:
        pyfuse3.invalidate_inode(inode, attr_only=True)

    def forget_name(self, name: bytes, inode: int) -> None:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, deleted=inode)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        else:
            entry = self.by_inode[inode]
            attr.st_mode = stat.S_IFREG | entry.mode
            attr.st_nlink = 1
            attr.st_uid, attr.st_gid = entry.owner, entry.group
        attr.st_size = 0
        attr.attr_timeout = 3600
        attr.entry_timeout = 3600
        return attr

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE and inode not in self.by_inode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        entry = self.entries.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(entry.inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = sorted(self.entries.items())
        for i, (name, entry) in enumerate(listing[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attrs(entry.inode), i):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    @errno_reply
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        entry = self.by_inode.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        fh = self._next_fh
        self._next_fh += 1
        opener = Opener(ctx.uid, ctx.gid, ctx.pid) if ctx is not None else Opener()
        self.files[fh] = (entry.node.open(flags, opener), bool(flags & os.O_NONBLOCK))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    def _file(self, fh: int) -> tuple[DeviceFile, bool]:
        try:
            return self.files[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    @errno_reply
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f, nonblock = self._file(fh)
        return await f.write(bytes(buf), nonblock)

    @errno_reply
    async def read(self, fh: int, off: int, size: int) -> bytes:
        f, nonblock = self._file(fh)
        return await f.read(size, nonblock)

    @errno_reply
    async def poll(self, inode: int, fh: int, poll_handle: Any, ctx: Any) -> int:
        f, _ = self._file(fh)
        wake = poll_handle.notify if poll_handle is not None else None
        return await f.poll(wake)

    async def flush(self, fh: int) -> None:
        return None

    @errno_reply
    async def release(self, fh: int) -> None:
        f, _ = self.files.pop(fh, (None, False))
        if f is not None:
            await f.release()


async def serve_fuse(
    node: Node | TpmFuse,
    mountpoint: str,
    *,
    name: str = "tpmrm0",
    mode: int = 0o660,
    owner: int | None = None,
    group: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``mountpoint`` and serve until cancelled; then unmount.

    ``node`` is one node (its file is ``name``) or a prepared directory of several
    (:class:`TpmFuse`).  ``task_status.started()`` is called once the files can be opened.
    """
    ops = node if isinstance(node, TpmFuse) else TpmFuse(node, name, mode, owner, group)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=cusetpm", "subtype=cusetpm", "default_permissions"}
    if os.getuid() == 0:
        options.add("allow_other")
    await unmount_dead(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    pyfuse3.init(ops, mountpoint, options)
    ops.mounted = True
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main, 1, 10_000)
            # The mount is live once init() returns; make sure the kernel can see the files.
            # Abandoned if pyfuse3's loop dies meanwhile: nobody would answer, and close() ends it.
            for entry_name in list(ops.entries):
                path = os.path.join(mountpoint, entry_name.decode())
                await trio.to_thread.run_sync(os.stat, path, abandon_on_cancel=True)
            task_status.started()
    finally:
        ops.mounted = False
        with trio.CancelScope(shield=True):
            for entry in list(ops.by_inode.values()):
                await entry.node.close_all()
            pyfuse3.close(unmount=True)
