# SPDX-License-Identifier: GPL-2.0-only
"""Raw TPM 2.0 commands over a TCP stream: swtpm's server port, or anything that speaks it."""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time

import trio

from ..kernel import wire
from ..kernel.wire import be32
from .base import BackendError, unframeable
from .spin import SpinWait

log = logging.getLogger(__name__)


async def connect_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (TCP_NODELAY), or :class:`BackendError`.

    A connection to itself is refused too.  Linux picks the source port of a loopback
    connect() from the ephemeral range (32768-60999 by default), which our swtpm ports share:
    while nobody listens yet on ``port`` (a swtpm starting up), a connect() that happens to
    pick ``port`` as its own source port connects to itself (TCP simultaneous open), and the
    TPM's "answer" is the command sent, read back (SelfTest answered "rc 0x143", its command
    code).  Seen once in a test run of the managed swtpm's start-up.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        try:
            sock.connect((host, port))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        if sock.getsockname() == sock.getpeername():
            raise OSError(errno.ECONNREFUSED, "connected to itself: nobody listens there yet")
    except OSError as exc:
        sock.close()
        raise BackendError(f"cannot connect to TPM at {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def connect_unix(address: str) -> socket.socket:
    """A connected non-blocking Unix stream socket to ``address`` (a path, or a name in the
    abstract namespace: a leading NUL), or :class:`BackendError`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            sock.connect(address)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
    except OSError as exc:
        sock.close()
        shown = "@" + address[1:] if address.startswith("\0") else address  # as ss(8) shows it
        raise BackendError(f"cannot connect to TPM at {shown}: {exc.strerror or exc}") from None
    return sock


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def recv_some(sock: socket.socket, most: int = 65536) -> bytes:
    """What the socket has (waiting for something); EOFError once the peer closed it."""
    while True:
        try:
            chunk = sock.recv(most)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not chunk:
            raise EOFError("TPM closed the connection")
        return chunk


class SocketBackend:
    """A TPM that speaks raw TPM 2.0 commands on a stream socket, as swtpm's server does: TCP
    to ``host:port``, or a Unix socket at ``unix`` when that is set (the managed swtpm's: an
    exchange over loopback TCP costs 10 to 20 µs more, issue 9).

    Uses a plain non-blocking socket and trio's readiness waits: this is on every command's
    path, and trio's socket wrappers cost as much again as the exchange itself.
    """

    def __init__(self, host: str, port: int, unix: str | None = None) -> None:
        self.host = host
        self.port = port
        self.unix = unix
        self.commands_sent = 0
        self._sock: socket.socket | None = None
        #: While :meth:`watch` runs: its sleep, the deadline of the exchange in flight (inf:
        #: none), and whether it passed.
        self._watch_scope: trio.CancelScope | None = None
        self._deadline = math.inf
        self._timed_out = False
        #: Polls for the answer briefly before sleeping for it (``serve --spin-us``; .spin).
        self.spin_wait: SpinWait | None = None
        #: The exchange :meth:`send_now` began: what is still to send, what came so far,
        #: its command code and when it was sent (for the spin's :meth:`SpinWait.answered`).
        self._out = b""
        self._in = b""
        self._cc = 0
        self._sent_at = 0.0

    async def connect(self) -> None:
        if self.unix is not None:
            self._sock = await connect_unix(self.unix)
        else:
            self._sock = await connect_tcp(self.host, self.port)

    async def watch(self) -> None:
        """Time every exchange out from this one task (the chip runs it while it serves).

        A ``fail_after`` per command is a cancel scope each, about 12 µs on every command's
        path (issue 9); here an exchange only writes its deadline down.  When one passes, the
        waiting exchange is woken with ``notify_closing`` and answers ``-ETIME``.
        """
        try:
            while True:
                with trio.CancelScope(deadline=self._deadline) as scope:
                    self._watch_scope = scope
                    await trio.sleep_forever()
                if trio.current_time() >= self._deadline:
                    self._expire()
        finally:
            self._watch_scope = None  # exchanges from now on time themselves out
            with trio.CancelScope(shield=True):
                while self._deadline < math.inf:  # the one in flight (at most one) still needs it
                    left = self._deadline - trio.current_time()
                    if left <= 0:
                        self._expire()
                        break
                    await trio.sleep(min(left, 0.01))

    def _expire(self) -> None:
        """The exchange in flight is late: wake it, to answer -ETIME."""
        self._deadline = math.inf  # told once
        if self._sock is not None:
            self._timed_out = True
            trio.lowlevel.notify_closing(self._sock)

    async def transmit(self, data: bytes, timeout: float) -> bytes | int:
        if self._watch_scope is not None and self._sock is not None:
            now = self.send_now(data, timeout)
            return now if now is not None else await self.answer()
        self.commands_sent += 1
        short = unframeable(data)
        if short is not None:
            return short
        try:
            with trio.fail_after(timeout):
                if self._sock is None:
                    await self.connect()
                rsp = await self._exchange(data)
            return self._checked(rsp)
        except trio.TooSlowError:
            # The late answer would desynchronize the stream: start a new connection.
            self._drop()
            return -errno.ETIME
        except (OSError, BackendError, EOFError, trio.ClosedResourceError) as exc:
            return self._lost(exc)

    def ready_now(self) -> bool:
        """May :meth:`send_now` be used?  Connected, and timed by :meth:`watch`."""
        return self._watch_scope is not None and self._sock is not None

    def send_now(self, data: bytes, timeout: float) -> bytes | int | None:
        """:meth:`transmit` without awaiting (``ready_now``): send ``data``; the answer if it
        came within the spin (or the errno), else None: then :meth:`answer` awaits it.

        The chip runs a client's command from the request loop with this when nobody else
        needs the TPM (issue 9): no task switch, no await, when swtpm answers in time.
        """
        self.commands_sent += 1
        short = unframeable(data)
        if short is not None:
            return short
        sock, watch = self._sock, self._watch_scope
        assert sock is not None and watch is not None
        deadline = trio.current_time() + timeout
        self._deadline, self._timed_out = deadline, False
        if deadline < watch.deadline:  # else the watch wakes earlier, and sleeps on to this one
            watch.deadline = deadline
        self._in = b""
        framed = self._frame(data)
        try:
            try:
                sent = sock.send(framed)
            except BlockingIOError:
                sent = 0
            self._out = framed[sent:]
            spin = self.spin_wait
            if spin is None:
                return None
            self._cc, self._sent_at = be32(data, 6), time.perf_counter()
            rsp = None
            if not self._out and spin.ready(sock.fileno(), spin.budget(self._cc)):
                rsp = self._recv_now(sock)
        except (OSError, EOFError) as exc:
            self._deadline = math.inf
            return self._lost(exc)
        if rsp is None:
            spin.awaiting(self._cc, self._sent_at)
            return None
        self._deadline = math.inf
        spin.answered(self._cc, time.perf_counter() - self._sent_at)
        return self._checked(rsp)

    def _recv_now(self, sock: socket.socket) -> bytes | None:
        """Read what the socket has; the whole response once it is in, else None."""
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return None
            if not chunk:
                raise EOFError("TPM closed the connection")
            self._in += chunk
            rsp = self._take(self._in)
            if rsp is not None:
                self._in = b""
                return rsp

    async def answer(self) -> bytes | int:
        """The answer to the command :meth:`send_now` sent, timed by :meth:`watch`:
        ``-ETIME`` once its deadline passed (even if the answer came just as it did)."""
        sock, rsp = self._sock, None
        try:
            try:
                if sock is None:
                    raise trio.ClosedResourceError
                if self._out:
                    await send_all(sock, self._out)
                    self._out = b""
                got = self._in
                while (rsp := self._take(got)) is None:
                    got += await recv_some(sock)
                self._in = b""
            except (OSError, EOFError, trio.ClosedResourceError):
                if not self._timed_out:  # woken by the watch: ClosedResourceError
                    raise
            finally:
                self._deadline = math.inf
            if self._timed_out or rsp is None:
                # The late answer would desynchronize the stream: start a new connection.
                self._drop()
                return -errno.ETIME
            if self.spin_wait is not None and self._sent_at:
                self.spin_wait.answered(self._cc, time.perf_counter() - self._sent_at)
                self._sent_at = 0.0
            return self._checked(rsp)
        except (OSError, EOFError, trio.ClosedResourceError) as exc:
            return self._lost(exc)

    def _checked(self, rsp: bytes) -> bytes:
        if len(rsp) != be32(rsp, 2):
            # More bytes than the header's size (or a size below the header's): whatever
            # follows on the stream is not the next response.  Start a new connection.
            self._drop()
        return rsp

    def _lost(self, exc: BaseException) -> int:
        log.warning("TPM transport error: %s", exc)
        self._drop()
        return -errno.EPIPE

    async def _exchange(self, data: bytes) -> bytes:
        sock = self._sock
        assert sock is not None
        await send_all(sock, self._frame(data))
        if self.spin_wait is not None:
            self.spin_wait.ready(sock.fileno())  # either way, recv_some then reads or waits
        got = b""
        while True:
            got += await recv_some(sock)
            rsp = self._take(got)
            if rsp is not None:
                return rsp

    def _frame(self, data: bytes) -> bytes:
        """A command as the TPM's protocol carries it (raw, here)."""
        return data

    def _take(self, got: bytes) -> bytes | None:
        """The response, once ``got`` (the bytes received so far) holds all of it: its
        header, and as many bytes as the header says (more: the caller drops the stream)."""
        return got if len(got) >= wire.TPM_HEADER_SIZE and len(got) >= be32(got, 2) else None

    async def probe(self, command: bytes) -> bytes:
        """One exchange outside the count and the deadlines (a start-up check)."""
        assert self._sock is not None
        return await self._exchange(command)

    def close(self) -> None:
        """Drop the connection (a later :meth:`connect` makes a new one)."""
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
            self._sock = None

    async def reconnect(self) -> None:
        self._drop()
        await self.connect()

    async def aclose(self) -> None:
        self._drop()


def swtpm_address(conf: str) -> tuple[str, int] | None:
    """(host, port) of a ``swtpm:`` TCTI configuration, else None.

    Such a TPM speaks raw commands on a socket, so :class:`SocketBackend` serves it without
    a thread hop per command (tpm2-tss's defaults: localhost, port 2321).
    """
    return tcp_address(conf, "swtpm")


def tcp_address(conf: str, tcti: str) -> tuple[str, int] | None:
    """(host, port) of a ``TCTI:host=H,port=P`` configuration (tpm2-tss's defaults: localhost,
    2321), else None (another TCTI, or options only tpm2-tss understands)."""
    name, _, rest = conf.partition(":")
    if name != tcti:
        return None
    options = dict(item.partition("=")[::2] for item in rest.split(",") if item)
    if set(options) - {"host", "port"}:
        return None
    return options.get("host", "localhost"), int(options.get("port", "2321"))
