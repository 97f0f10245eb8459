# SPDX-License-Identifier: GPL-2.0-only
"""TCP relays in front of a swtpm, for tests and the benchmark.

* :class:`SwtpmMux`: a swtpm of the caller's own that several clients reach at once (swtpm
  itself serves one data client at a time); whole commands are forwarded one at a time, so
  :meth:`SwtpmMux.transact` can slip its own between a daemon's.
* :class:`CountingRelay`: a byte-for-byte relay that counts the TPM command frames passing
  to the data port.

Blocking sockets and daemon threads: only for test and bench processes.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

from .swtpm import Swtpm


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_tpm_message(sock: socket.socket) -> bytes:
    """One whole TPM command or response (10-byte header, size at offset 2)."""
    header = _recv_exact(sock, 10)
    (size,) = struct.unpack(">I", header[2:6])
    return header + _recv_exact(sock, max(size - 10, 0))


def count_frames(data: bytes) -> tuple[int, bytes]:
    """Complete TPM command frames at the start of ``data`` (size at offset 2), and the rest."""
    n = 0
    while len(data) >= 10:
        size = int.from_bytes(data[2:6], "big")
        if size < 10 or len(data) < size:
            break
        data = data[size:]
        n += 1
    return n, data


def _listen_pair(attempts: int = 200) -> tuple[int, list[socket.socket]]:
    """Listening sockets on 127.0.0.1:P and P+1 for some free P."""
    for _ in range(attempts):
        port = random.randrange(20000, 60000)
        socks: list[socket.socket] = []
        try:
            for p in (port, port + 1):
                socks.append(socket.create_server(("127.0.0.1", p), backlog=8))
        except OSError:
            for s in socks:
                s.close()
            continue
        return port, socks
    raise RuntimeError("no free loopback port pair for the relay")


def _accept_loop(
    listener: socket.socket,
    serve: Callable[[socket.socket], None],
    sockets: list[socket.socket],
    closing: Callable[[], bool],
) -> None:
    """Accept until the listener closes; each connection served in a daemon thread."""
    while not closing():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        sockets.append(conn)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


class SwtpmMux:
    """A swtpm of the caller's own, reachable by several clients at once.

    Clients connect to ``port`` (raw TPM commands, as swtpm's data channel) and ``port + 1``
    (forwarded byte for byte to swtpm's control channel, which tpm2-tss's swtpm TCTI uses to
    set the locality).  Each whole command is forwarded on the one connection to swtpm under
    a lock, so :meth:`transact` can put its own commands between the daemon's.
    """

    def __init__(self, state_dir: Path) -> None:
        self.swtpm = Swtpm.start(state_dir)
        try:
            self._backend = self.swtpm.connect()
            self.port, self._listeners = _listen_pair()
        except BaseException:
            self.swtpm.stop()
            raise
        self._lock = threading.Lock()
        self._closing = False
        self._sockets: list[socket.socket] = []
        data, ctrl = self._listeners
        threading.Thread(target=self._accept, args=(data, self._serve_data), daemon=True).start()
        threading.Thread(target=self._accept, args=(ctrl, self._serve_ctrl), daemon=True).start()

    def transact(self, command: bytes) -> bytes:
        """Send one raw command to swtpm and return its response."""
        with self._lock:
            self._backend.sendall(command)
            return recv_tpm_message(self._backend)

    def _accept(self, listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
        _accept_loop(listener, serve, self._sockets, lambda: self._closing)

    def _serve_data(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    command = recv_tpm_message(conn)
                    conn.sendall(self.transact(command))
                except (OSError, EOFError):
                    return

    def _serve_ctrl(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.swtpm.port + 1), timeout=30)
        except OSError:
            conn.close()
            return
        self._sockets.append(upstream)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(4096):
                    dst.sendall(chunk)
            except OSError:
                pass
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def close(self) -> None:
        self._closing = True
        for s in self._listeners + self._sockets + [self._backend]:
            _shut(s)
        self.swtpm.stop()


class CountingRelay:
    """Loopback TCP relay RELAY -> target (data port) and RELAY+1 -> target+1 (control port).

    Counts the complete TPM command frames (10-byte header, size at offset 2) sent to the
    data port.  Blocking sockets and threads; the benchmark uses it only in its counting pass.
    """

    def __init__(self, target_port: int) -> None:
        self.commands = 0
        self._lock = threading.Lock()
        self._closed = False
        self.port, listeners = _listen_pair()
        self._socks: list[socket.socket] = list(listeners)
        for off, lsock in enumerate(listeners):
            threading.Thread(target=self._accept, args=(lsock, target_port + off, off == 0), daemon=True).start()

    def _accept(self, lsock: socket.socket, target: int, count: bool) -> None:
        # tpm2-tss's swtpm TCTI opens a new data connection for every command: keep up.
        while not self._closed:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", target))
            except OSError:
                client.close()
                continue
            pair = [client, server]
            with self._lock:
                self._socks += pair
            for s in pair:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            done = threading.Barrier(2, action=lambda pair=pair: self._forget(pair))  # type: ignore[misc]
            threading.Thread(target=self._pump, args=(client, server, count, done), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, done), daemon=True).start()

    def _forget(self, pair: list[socket.socket]) -> None:
        with self._lock:
            for s in pair:
                s.close()
                with contextlib.suppress(ValueError):
                    self._socks.remove(s)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool, done: threading.Barrier) -> None:
        pending = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    n, pending = count_frames(pending + data)
                    with self._lock:
                        self.commands += n
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _shut(s)


class FlakyRelay:
    """A byte-for-byte TCP relay to 127.0.0.1:``target`` that can fail on purpose.

    :meth:`cut_next_response` forwards only the first few bytes of the next response and then
    closes both connections (a TPM transport that dies mid-response); ``target`` may be
    changed at any time (a TPM restarted elsewhere); :meth:`drop` closes what is open now.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=8)
        self.port: int = self._listener.getsockname()[1]
        self._cut: int | None = None
        self._rewrite: Callable[[bytes], bytes | None] | None = None
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_next_response(self, after: int = 4) -> None:
        with self._lock:
            self._cut = after

    def rewrite_next_response(self, fn: Callable[[bytes], bytes | None]) -> None:
        """Send ``fn(response)`` instead of the next whole response (None: send nothing)."""
        with self._lock:
            self._rewrite = fn

    def drop(self) -> None:
        with self._lock:
            socks, self._open = self._open, []
        for s in socks:
            _shut(s)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    cut, self._cut = (self._cut, None) if responses else (None, self._cut)
                    rewrite, self._rewrite = (self._rewrite, None) if responses else (None, self._rewrite)
                if cut is not None:
                    dst.sendall(chunk[:cut])
                    break
                if rewrite is not None:
                    size = struct.unpack(">I", chunk[2:6])[0] if len(chunk) >= 6 else 0
                    if len(chunk) < size:
                        chunk += _recv_exact(src, size - len(chunk))
                    out = rewrite(chunk)
                    if out is not None:
                        dst.sendall(out)
                    continue
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            _shut(s)

    def close(self) -> None:
        self._closing = True
        _shut(self._listener)
        self.drop()


#: The Microsoft/IBM simulator's socket protocol (tpm2-tss's tcti-mssim speaks it).
MSSIM_SEND_COMMAND = 8
MSSIM_SESSION_END = 20


class MssimFront:
    """The MS/IBM TPM simulator's two-port protocol in front of a swtpm of the caller's own.

    Command port ``port``: ``u32 8, u8 locality, u32 size, command`` is answered ``u32 size,
    response, u32 0``; ``u32 20`` ends the session.  Platform port ``port + 1``: every ``u32``
    signal (power on, NV on, ...) is acknowledged with ``u32 0``.  Enough for tpm2-tss's mssim
    TCTI and for cusetpm's own mssim backend; ``signals`` records what the platform port got.
    """

    def __init__(self, state_dir: Path) -> None:
        self.swtpm = Swtpm.start(state_dir)
        try:
            self._tpm = self.swtpm.connect()
            self.port, self._listeners = _listen_pair()
        except BaseException:
            self.swtpm.stop()
            raise
        self._lock = threading.Lock()
        self.signals: list[int] = []
        self._closing = False
        self._sockets: list[socket.socket] = []
        cmd, platform = self._listeners
        threading.Thread(target=self._accept, args=(cmd, self._serve_commands), daemon=True).start()
        threading.Thread(target=self._accept, args=(platform, self._serve_platform), daemon=True).start()

    def _accept(self, listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
        _accept_loop(listener, serve, self._sockets, lambda: self._closing)

    def _serve_commands(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    (what,) = struct.unpack(">I", _recv_exact(conn, 4))
                    if what == MSSIM_SESSION_END:
                        return
                    if what != MSSIM_SEND_COMMAND:
                        conn.sendall(struct.pack(">I", 0))
                        continue
                    _locality, size = struct.unpack(">BI", _recv_exact(conn, 5))
                    command = _recv_exact(conn, size)
                    with self._lock:
                        self._tpm.sendall(command)
                        rsp = recv_tpm_message(self._tpm)
                    conn.sendall(struct.pack(">I", len(rsp)) + rsp + struct.pack(">I", 0))
            except (OSError, EOFError):
                return

    def _serve_platform(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    (signal_,) = struct.unpack(">I", _recv_exact(conn, 4))
                    self.signals.append(signal_)
                    if signal_ == MSSIM_SESSION_END:
                        return
                    conn.sendall(struct.pack(">I", 0))
            except (OSError, EOFError):
                return

    def close(self) -> None:
        self._closing = True
        for s in self._listeners + self._sockets + [self._tpm]:
            _shut(s)
        self.swtpm.stop()
