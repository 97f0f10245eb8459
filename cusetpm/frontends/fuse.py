# SPDX-License-Identifier: GPL-2.0-only
"""FUSE front end: ``DIR/tpmrm0`` as a file whose every open() is a new TPM space.

For kernels without CUSE.  The directory is mounted with ``fusermount3`` (which hands back the
/dev/fuse descriptor, root or not) and served by the same request loop as the CUSE device
(:class:`~cusetpm.frontends.channel.Channel`, its fast path included), on the same sans-I/O
protocol layer (:mod:`.cuse_proto`, :mod:`.fuse_proto`).  Why not pyfuse3, the design's FUSE
library (still there: ``--fuse-lib pyfuse3``, :mod:`.fuse_pyfuse3`): its dispatch cost 22 µs an
idle request against 9 µs for this loop and 7.7 µs for C libfuse, client and daemon on one CPU
(README, "The request path").

One directory holds one file per node; opens are direct I/O and non-seekable (pread/pwrite give
ESPIPE), and poll is answered with wake-ups, so tpm2-tss's device TCTI works on it unchanged.
Differences from a character device, which FUSE decides before we see the call:
write(fd, buf, 0) and read(fd, buf, 0) return 0 and writev() is one write.  ioctl is ENOTTY, as
on the kernel's node.  Unlike pyfuse3, every read and write carries the file's flags as they are
now, so O_NONBLOCK set with fcntl(F_SETFL) counts, as on the kernel's node.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..daemon.file import Opener
from ..daemon.node import Node
from . import cuse_proto as proto
from . import fuse_proto as fsp
from .channel import DEFAULT_SPIN, Channel, ChannelWatch

__all__ = ["Directory", "Entry", "TpmFuse", "serve_fuse", "unmount_dead"]

log = logging.getLogger(__name__)

FILE_INODE = fsp.ROOT_INODE + 1


@dataclass(slots=True)
class Entry:
    """One node's file in the directory."""

    node: Node
    inode: int
    mode: int = 0o660
    owner: int = -1
    group: int = -1


class Directory:
    """The directory's names and inodes, one file per node, whatever serves them.

    Tenant nodes (``--config``) come and go with a reload: :meth:`add` makes a file appear,
    :meth:`hide` takes its name away (files open on it go on), :meth:`forget_node` drops it.
    What tells the kernel is the server's: :meth:`invalidate_attrs`, :meth:`forget_name`.
    """

    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.by_inode: dict[int, Entry] = {}
        self._next_inode = FILE_INODE
        self.mounted = False

    def add(self, node: Node, name: str, mode: int = 0o660, owner: int | None = None,
            group: int | None = None) -> None:  # fmt: skip
        """A file ``name`` for ``node``.  Its owner and group default to the daemon's; the
        kernel checks them against ``mode`` itself (``default_permissions``), so a client
        without access gets EACCES."""
        entry = Entry(node, self._next_inode)
        self._next_inode += 1
        self._set(entry, mode, owner, group)
        self.entries[name.encode()] = entry
        self.by_inode[entry.inode] = entry

    def set_attrs(self, name: str, mode: int, owner: int | None, group: int | None) -> None:
        """A reload changed a file's mode or owner: the next stat shows it."""
        entry = self.entries[name.encode()]
        self._set(entry, mode, owner, group)
        if self.mounted:
            self.invalidate_attrs(entry.inode)

    @staticmethod
    def _set(entry: Entry, mode: int, owner: int | None, group: int | None) -> None:
        entry.mode = mode
        entry.owner = os.getuid() if owner is None else owner
        entry.group = os.getgid() if group is None else group

    def hide(self, name: str) -> None:
        """No new open of ``name``: it leaves the directory (the kernel forgets its entry)."""
        entry = self.entries.pop(name.encode(), None)
        if entry is not None and self.mounted:
            self.forget_name(name.encode(), entry.inode)

    def forget_node(self, node: Node) -> None:
        """The node's last file closed: its inode goes too."""
        for inode, entry in list(self.by_inode.items()):
            if entry.node is node:
                del self.by_inode[inode]

    def invalidate_attrs(self, inode: int) -> None:
        raise NotImplementedError

    def forget_name(self, name: bytes, inode: int) -> None:
        raise NotImplementedError


class TpmFuse(Channel, Directory):
    """A directory of TPM device files, one per node, on one /dev/fuse channel."""

    def __init__(
        self, node: Node | None = None, name: str = "tpmrm0", mode: int = 0o660, owner: int | None = None,
        group: int | None = None,
    ) -> None:  # fmt: skip
        Channel.__init__(self, -1, "fuse")
        Directory.__init__(self)
        self.fd = None
        #: Notifications that take the directory's lock in the kernel: written by a thread,
        #: since a lookup waiting for this loop may hold that lock.
        self._notify_send: trio.MemorySendChannel[bytes] | None = None
        if node is not None:
            self.add(node, name, mode, owner, group)

    def invalidate_attrs(self, inode: int) -> None:
        self.send(fsp.notify_inval_inode(inode))

    def forget_name(self, name: bytes, inode: int) -> None:
        if self._notify_send is not None:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._notify_send.send_nowait(fsp.notify_delete(fsp.ROOT_INODE, inode, name))

    def _attr(self, inode: int) -> fsp.Attr:
        if inode == fsp.ROOT_INODE:
            return fsp.Attr(inode, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid())
        entry = self.by_inode[inode]
        return fsp.Attr(inode, stat.S_IFREG | entry.mode, 1, entry.owner, entry.group)

    # -- requests ------------------------------------------------------------

    def open_file(self, req: proto.Open) -> bytes:
        entry = self.by_inode.get(req.header.nodeid)
        if entry is None:
            err = errno.EISDIR if req.header.nodeid == fsp.ROOT_INODE else errno.ENOENT
            return proto.reply_error(req.unique, err)
        h = req.header
        fh = self.add_file(entry.node.open(req.flags, Opener(h.uid, h.gid, h.pid)))
        return proto.reply_open(req.unique, fh, proto.FOPEN_DIRECT_IO | proto.FOPEN_NONSEEKABLE)

    def other(self, req: proto.Request) -> bytes | None:
        op, unique, inode = req.header.opcode, req.unique, req.header.nodeid
        body = req.body if isinstance(req, proto.Unknown) else b""
        if op == fsp.FsOpcode.LOOKUP:
            entry = self.entries.get(fsp.parse_name(body)) if inode == fsp.ROOT_INODE else None
            if entry is None:
                return fsp.reply_error(unique, errno.ENOENT)
            return fsp.reply_entry(unique, self._attr(entry.inode))
        if op == fsp.FsOpcode.GETATTR:
            if inode != fsp.ROOT_INODE and inode not in self.by_inode:
                return fsp.reply_error(unique, errno.ENOENT)
            return fsp.reply_attr(unique, self._attr(inode))
        if op == fsp.FsOpcode.OPENDIR:
            if inode != fsp.ROOT_INODE:
                return fsp.reply_error(unique, errno.ENOTDIR)
            return proto.reply_open(unique, 0, 0)
        if op == fsp.FsOpcode.READDIR:
            offset, size = fsp.parse_readdir(body)
            root = self._attr(fsp.ROOT_INODE)
            listing = [(b".", root), (b"..", root)]
            listing += [(name, self._attr(e.inode)) for name, e in sorted(self.entries.items())]
            return fsp.reply_readdir(unique, listing, offset, size)
        if op == fsp.FsOpcode.RELEASEDIR:
            return proto.reply(unique)
        if op == fsp.FsOpcode.STATFS:
            return fsp.reply_statfs(unique)
        if op == fsp.FsOpcode.INIT:
            return fsp.reply_error(unique, errno.EPROTO)  # only once, at the start
        return proto.default_reply(req)

    async def handshake(self) -> None:
        """Answer FUSE_INIT, the first request of a fresh mount."""
        buf = await self.read_request()
        if buf is None:
            raise OSError(errno.ENODEV, "/dev/fuse closed before FUSE_INIT")
        req = proto.parse_request(buf)
        if req.header.opcode != fsp.FsOpcode.INIT or not isinstance(req, proto.Unknown):
            raise proto.ProtocolError(f"expected FUSE_INIT, got opcode {req.header.opcode}")
        major, minor, readahead, flags = fsp.parse_init(req.body)
        if major != proto.FUSE_KERNEL_VERSION or minor < proto.SUPPORTED_MINOR:
            self.send(proto.reply_error(req.unique, errno.EPROTO))
            raise proto.ProtocolError(f"kernel speaks FUSE {major}.{minor}")
        self.send(fsp.reply_init(req.unique, kernel_minor=minor, readahead=readahead, kernel_flags=flags))

    async def notifier(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        """Write the notifications that may block on a directory lock, from a thread."""
        async for message in receive:
            fd = self.fd
            if fd is None:
                return
            with contextlib.suppress(OSError):  # ENOENT: the kernel had forgotten the name already
                await trio.to_thread.run_sync(os.write, fd, message, abandon_on_cancel=True)


async def mount(mountpoint: str, options: str) -> int:
    """Mount ``mountpoint`` with fusermount3; the /dev/fuse descriptor it sends back."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        done = await trio.run_process(
            ["fusermount3", "-o", options, "--", mountpoint], env=env, pass_fds=(theirs.fileno(),),
            check=False, capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
        theirs.close()
        fds = array.array("i")
        ours.setblocking(False)
        try:
            _, ancillary, _, _ = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
        except BlockingIOError:
            ancillary = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: fds.itemsize])
    if not fds:
        why = done.stderr.decode(errors="replace").strip() or f"status {done.returncode}"
        raise OSError(errno.EIO, f"fusermount3 could not mount {mountpoint}: {why}")
    os.set_blocking(fds[0], False)
    os.set_inheritable(fds[0], False)
    return fds[0]


async def unmount(mountpoint: str) -> None:
    """Lazily unmount (files still open keep the mount until they close)."""
    await trio.run_process(["fusermount3", "-u", "-z", "--", mountpoint], check=False, capture_stderr=True)


async def unmount_dead(mountpoint: str) -> None:
    """A daemon killed with SIGKILL leaves its mount behind, answering ENOTCONN; lazily
    unmount it so that the new mount does not stack on a dead one."""
    try:
        os.statvfs(mountpoint)  # stat() may be answered from the attribute cache; statfs never is
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
        log.warning("%s: a dead FUSE mount (a killed daemon's?); unmounting it", mountpoint)
        await unmount(mountpoint)


async def serve_fuse(
    node: Node | TpmFuse,
    mountpoint: str,
    *,
    name: str = "tpmrm0",
    mode: int = 0o660,
    owner: int | None = None,
    group: int | None = None,
    spin: float = DEFAULT_SPIN,
    pause_spin: Callable[[], bool] | None = None,
    watch: ChannelWatch | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``mountpoint`` and serve until cancelled; then unmount.

    ``node`` is one node (its file is ``name``) or a prepared directory of several
    (:class:`TpmFuse`).  ``task_status.started()`` is called once the files can be opened.
    """
    fs = node if isinstance(node, TpmFuse) else TpmFuse(node, name, mode, owner, group)
    fs.spin = spin
    fs.pause_spin = pause_spin
    options = "nosuid,nodev,fsname=cusetpm,subtype=cusetpm,default_permissions"
    if os.getuid() == 0:
        options += ",allow_other"
    await unmount_dead(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    fd = await mount(mountpoint, options)
    fs.fd = fd
    fs.watch = watch
    if watch is not None:
        watch.watch(fd)
    notify_send, notify_receive = trio.open_memory_channel[bytes](64)
    fs._notify_send = notify_send
    try:
        async with trio.open_nursery() as nursery:
            await fs.handshake()
            fs.mounted = True

            async def loop_then_stop() -> None:
                await fs.request_loop(nursery)
                nursery.cancel_scope.cancel()  # unmounted under us: abandon requests in flight

            nursery.start_soon(loop_then_stop)
            nursery.start_soon(fs.notifier, notify_receive)
            # The mount is live; make sure the kernel can see the files.  Abandoned if the loop
            # dies meanwhile: nobody would answer the stat, and closing the channel ends it.
            for entry_name in list(fs.entries):
                path = os.path.join(mountpoint, entry_name.decode())
                await trio.to_thread.run_sync(os.stat, path, abandon_on_cancel=True)
            task_status.started()
    finally:
        fs.mounted = False
        notify_send.close()
        with trio.CancelScope(shield=True):
            for entry in list(fs.by_inode.values()):
                await entry.node.close_all()
            await fs.release_all()
            await unmount(mountpoint)
            if watch is not None:
                watch.forget(fd)
            fs.fd = None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
