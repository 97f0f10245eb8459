# SPDX-License-Identifier: GPL-2.0-only
"""FUSE front end: ``DIR/tpmrm0`` as a file whose every open() is a new TPM space.

For kernels without CUSE.  pyfuse3 serves one directory holding one file; opens are direct
I/O and non-seekable (pread/pwrite give ESPIPE), and poll is answered with wake-ups, so
tpm2-tss's device TCTI works on it unchanged.  Differences from a character device, which
FUSE decides before we see the call: write(fd, buf, 0) and read(fd, buf, 0) return 0, O_NONBLOCK
is taken from open() (FUSE does not pass fcntl(F_SETFL) changes to pyfuse3's write handler),
and writev() is one write.  ioctl gives ENOTTY as on the kernel's node: pyfuse3 has no ioctl
handler, so libfuse answers ENOSYS and the kernel turns that into ENOTTY.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Any, Callable, Coroutine, ParamSpec, TypeVar

import pyfuse3
import trio

from ..daemon.node import DeviceFile, Node, Opener

log = logging.getLogger(__name__)

FILE_INODE = pyfuse3.ROOT_INODE + 1

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


class TpmFuse(pyfuse3.Operations):
    """pyfuse3 operations for a directory with one TPM device file."""

    enable_writeback_cache = False

    def __init__(
        self, node: Node, name: str = "tpmrm0", mode: int = 0o660, owner: int | None = None, group: int | None = None
    ) -> None:
        super().__init__()
        self.node = node
        self.name = name.encode()
        self.mode = mode
        #: The file's owner and group (default: the daemon's); the kernel checks them against
        #: ``mode`` itself (``default_permissions``), so a client without access gets EACCES.
        self.owner = os.getuid() if owner is None else owner
        self.group = os.getgid() if group is None else group
        self.files: dict[int, tuple[DeviceFile, bool]] = {}
        self._next_fh = 1

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | self.mode
            attr.st_nlink = 1
        attr.st_uid = self.owner if inode != pyfuse3.ROOT_INODE else os.getuid()
        attr.st_gid = self.group if inode != pyfuse3.ROOT_INODE else os.getgid()
        attr.st_size = 0
        attr.attr_timeout = 3600
        attr.entry_timeout = 3600
        return attr

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id < 1:
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE_INODE), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    @errno_reply
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        opener = Opener(ctx.uid, ctx.gid, ctx.pid) if ctx is not None else Opener()
        self.files[fh] = (self.node.open(flags, opener), bool(flags & os.O_NONBLOCK))
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


async def unmount_dead(mountpoint: str) -> None:
    """A daemon killed with SIGKILL leaves its mount behind, answering ENOTCONN; lazily
    unmount it so that the new mount does not stack on a dead one."""
    try:
        os.statvfs(mountpoint)  # stat() may be answered from the attribute cache; statfs never is
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
        log.warning("%s: a dead FUSE mount (a killed daemon's?); unmounting it", mountpoint)
        await trio.run_process(["fusermount3", "-u", "-z", mountpoint], check=False)


async def serve_fuse(
    node: Node,
    mountpoint: str,
    *,
    name: str = "tpmrm0",
    mode: int = 0o660,
    owner: int | None = None,
    group: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``mountpoint`` and serve until cancelled; then unmount.

    ``task_status.started()`` is called once the file can be opened.
    """
    ops = TpmFuse(node, name, mode, owner, group)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=cusetpm", "subtype=cusetpm", "default_permissions"}
    if os.getuid() == 0:
        options.add("allow_other")
    await unmount_dead(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main, 1, 10_000)
            # The mount is live once init() returns; make sure the kernel can see the file.
            await trio.to_thread.run_sync(os.stat, os.path.join(mountpoint, name))
            task_status.started()
    finally:
        with trio.CancelScope(shield=True):
            await node.close_all()
            pyfuse3.close(unmount=True)
