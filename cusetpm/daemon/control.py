# SPDX-License-Identifier: GPL-2.0-only
"""The control socket: what the daemon is doing, for ``cusetpm status``.

A Unix stream socket that answers each connection with one JSON document and closes it.  It
listens only where ``--control`` says (default: ``cusetpm/control.sock`` in the user's
runtime dir; ``--control off``: nowhere), created with mode 0600 in a directory of mode 0700, so
only the daemon's user (and root) may ask.  The document is :func:`snapshot`: the backing TPM
(epoch, restarts, commands sent), every node and every open file with who opened it and what
its space holds, and the seam's own snapshot where a feature has one (``--sessions global``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

import trio

from .chip import TpmChip
from .node import Node

log = logging.getLogger(__name__)


def default_control_path() -> str:
    """Next to the FUSE default: the user's runtime dir, /run for root."""
    if os.getuid() == 0:
        return "/run/cusetpm-control.sock"  # not under /run/cusetpm: that is the FUSE default
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cusetpm-{os.getuid()}"
    return os.path.join(base, "cusetpm", "control.sock")


def _file(f: Any) -> dict[str, Any]:
    space = f.state.space
    return {
        "uid": f.opener.uid,
        "gid": f.opener.gid,
        "pid": f.opener.pid,
        "comm": f.comm,
        "objects": sum(1 for h in space.context_tbl if h),
        "sessions": [f"0x{h:08x}" for h in space.session_tbl if h],
        "busy": f.state.command_enqueued or f.lock.value == 0,
        "epoch": f.epoch,
    }


def snapshot(chip: TpmChip, nodes: list[Node]) -> dict[str, Any]:
    """Everything ``cusetpm status`` shows, as plain data."""
    seams: list[Any] = []
    out: dict[str, Any] = {
        "tpm": {
            "available": chip.available,
            "epoch": chip.epoch,
            "reconnects": chip.reconnects,
            "restarts": chip.restarts,
            "commands_sent": chip.backend.commands_sent,
        },
        "nodes": [],
    }
    for node in nodes:
        seam = node.core.seam.feature if node.core.seam is not None else None
        entry: dict[str, Any] = {
            "name": node.name,
            "kernel": node.profile.name,
            "seam": type(seam).__name__ if seam is not None else "kernel",
            "files": [_file(f) for f in sorted(node.files, key=lambda f: (f.opener.pid, id(f)))],
        }
        entry.update(node.tenant_status())
        out["nodes"].append(entry)
        for feature in node.core.seam.features if node.core.seam is not None else ():
            snap = getattr(feature, "snapshot", None)
            if snap is not None and feature not in seams:
                seams.append(feature)
                out.setdefault("features", {})[type(feature).__name__] = snap()
    return out


class ControlInUse(OSError):
    """A live daemon already answers on that control socket."""


def bind_control(path: str) -> socket.socket:
    """The listening socket, made before the node serves so that a clash is a one-line error
    at start (:class:`ControlInUse`, an OSError)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a dead daemon's socket
        else:
            probe.close()
            raise ControlInUse(f"{path}: another cusetpm daemon answers there; give this one --control PATH")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


async def serve_control(chip: TpmChip, nodes: list[Node], sock: socket.socket, path: str) -> None:
    """Answer status requests on ``sock`` (bound at ``path``) until cancelled; then remove it."""
    listener = trio.socket.from_stdlib_socket(sock)
    try:
        while True:
            conn, _ = await listener.accept()
            with conn, trio.move_on_after(5):  # a client that does not read holds nobody up
                try:
                    data = memoryview(json.dumps(snapshot(chip, nodes), sort_keys=True).encode() + b"\n")
                    while data:
                        data = data[await conn.send(data) :]
                except OSError as exc:
                    log.info("status client went away: %s", exc)
                except Exception:  # a status bug must never take the daemon down
                    log.exception("status failed")
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass
