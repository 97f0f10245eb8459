# SPDX-License-Identifier: GPL-2.0-only
"""A pcapng file of made-up TCP connections, written with struct alone.

Wireshark picks a dissector for a TCP payload by port, so bytes that never crossed a network
(a TPM node's commands and responses) can be decoded by an existing dissector if they are
wrapped in Ethernet/IPv4/TCP frames to that port.  :class:`TcpCapture` does the wrapping, with
a handshake per connection, right sequence numbers and checksums, so Wireshark's TCP analysis
finds nothing to flag.  It knows nothing of TPMs: :class:`cusetpm.tenants.audit.PcapngWriter`
decides what goes in.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from typing import IO

#: The largest TCP payload one IPv4 packet holds (a longer payload is the caller's to cut).
MAX_PAYLOAD = 65535 - 20 - 20

_CLIENT_PORT_BASE = 49152
_CLIENT_PORTS = 65536 - _CLIENT_PORT_BASE
_SERVER_IP = 0x7F000001  # 127.0.0.1
_CLIENT_IP = 0x7F000002  # 127.0.0.2, one more for every 16384 connections
_SERVER_MAC = b"\x02\x00\x00\x00\x00\x01"
_CLIENT_MAC = b"\x02\x00\x00\x00\x00\x02"
_SYN, _FIN, _PSH, _ACK = 0x02, 0x01, 0x08, 0x10
_LINKTYPE_ETHERNET = 1
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _options(*opts: tuple[int, bytes]) -> bytes:
    """pcapng options, each padded to 32 bits, then opt_endofopt."""
    out = b"".join(struct.pack("<HH", code, len(v)) + v + bytes(-len(v) % 4) for code, v in opts)
    return out + b"\x00\x00\x00\x00" if out else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


@dataclass(slots=True)
class _Connection:
    """One connection's client address and both sides' next sequence numbers."""

    client_ip: int
    client_port: int
    client_seq: int = 0
    server_seq: int = 0


class TcpCapture:
    """Connections from 127.0.0.2:49152+N (then 127.0.0.3, …) to 127.0.0.1:``server_port``, one
    per connection number N, as a pcapng file: one Section Header Block and one Ethernet
    Interface Description Block (microsecond timestamps) at the start, then Enhanced Packet
    Blocks.  The file is truncated at open (like ``tcpdump -w``), created owner-only, and
    written through so it can be read while it grows; "-" is stdout."""

    def __init__(self, path: str, server_port: int, application: str = "cusetpm") -> None:
        self.server_port = server_port
        self._connections: dict[int, _Connection] = {}
        self._ip_id = 0
        self._file: IO[bytes] | None
        if path == "-":
            self._file = sys.stdout.buffer
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "wb", buffering=0)
        name = application.encode()
        shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _options((4, name))  # shb_userappl
        idb = struct.pack("<HHI", _LINKTYPE_ETHERNET, 0, 0) + _options((2, name), (9, b"\x06"))  # if_tsresol
        self._emit(_block(_SHB, shb) + _block(_IDB, idb))

    def _emit(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("write to a closed capture")
        self._file.write(data)
        self._file.flush()

    def _packet(self, when: float, c: _Connection, from_client: bool, flags: int, payload: bytes = b"",
                comment: str = "") -> bytes:  # fmt: skip
        """One Enhanced Packet Block (Ethernet, IPv4, TCP, payload); advances the sender's seq."""
        if from_client:
            src, dst, sport, dport = c.client_ip, _SERVER_IP, c.client_port, self.server_port
            seq, ack, macs = c.client_seq, c.server_seq, _SERVER_MAC + _CLIENT_MAC
        else:
            src, dst, sport, dport = _SERVER_IP, c.client_ip, self.server_port, c.client_port
            seq, ack, macs = c.server_seq, c.client_seq, _CLIENT_MAC + _SERVER_MAC
        advance = len(payload) + (1 if flags & (_SYN | _FIN) else 0)
        if from_client:
            c.client_seq = (c.client_seq + advance) & 0xFFFFFFFF
        else:
            c.server_seq = (c.server_seq + advance) & 0xFFFFFFFF
        tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, ack if flags & _ACK else 0, 5 << 4, flags, 65535, 0, 0)
        pseudo = struct.pack(">IIBBH", src, dst, 0, 6, len(tcp) + len(payload))
        tcp = tcp[:16] + struct.pack(">H", _checksum(pseudo + tcp + payload)) + tcp[18:]
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        ip = struct.pack(">BBHHHBBHII", 0x45, 0, 20 + len(tcp) + len(payload), self._ip_id, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack(">H", _checksum(ip)) + ip[12:]
        frame = macs + b"\x08\x00" + ip + tcp + payload
        us = max(0, int(round(when * 1e6)))
        body = struct.pack("<IIIII", 0, us >> 32, us & 0xFFFFFFFF, len(frame), len(frame))
        body += frame + bytes(-len(frame) % 4)
        if comment:
            body += _options((1, comment.encode("utf-8", "backslashreplace")))  # opt_comment
        return _block(_EPB, body)

    def _connection(self, number: int, when: float) -> tuple[_Connection, bytes]:
        """The connection's state, and the handshake to write first if it is new."""
        c = self._connections.get(number)
        if c is not None:
            return c, b""
        index = number % (1 << 40)
        c = _Connection((_CLIENT_IP + index // _CLIENT_PORTS) & 0xFFFFFFFF, _CLIENT_PORT_BASE + index % _CLIENT_PORTS)
        self._connections[number] = c
        out = self._packet(when, c, True, _SYN) + self._packet(when, c, False, _SYN | _ACK)
        return c, out + self._packet(when, c, True, _ACK)

    def exchange(self, number: int, request: bytes, request_time: float, response: bytes, response_time: float,
                 comment: str = "") -> None:  # fmt: skip
        """A request segment from the client (with ``comment``) and a response segment from the
        server, written together; an empty one is left out, a new connection is opened first.
        Each payload must fit one packet (:data:`MAX_PAYLOAD`)."""
        if len(request) > MAX_PAYLOAD or len(response) > MAX_PAYLOAD:
            raise ValueError(f"a segment holds at most {MAX_PAYLOAD} bytes")
        c, out = self._connection(number, request_time)
        if request:
            out += self._packet(request_time, c, True, _PSH | _ACK, request, comment)
        if response:
            out += self._packet(response_time, c, False, _PSH | _ACK, response)
        self._emit(out)

    def finish(self, number: int, when: float) -> None:
        """Close the connection: FIN both ways and the last ACK (the number may be used again,
        for a new connection)."""
        c = self._connections.pop(number, None)
        if c is not None:
            out = self._packet(when, c, True, _FIN | _ACK) + self._packet(when, c, False, _FIN | _ACK)
            self._emit(out + self._packet(when, c, True, _ACK))

    def close(self) -> None:
        """Close the file (stdout is flushed and left open); idempotent."""
        f, self._file = self._file, None
        if f is sys.stdout.buffer:
            f.flush()
        elif f is not None:
            f.close()
