# SPDX-License-Identifier: GPL-2.0-only
"""``cusetpm status``: ask a running daemon what it is doing (its control socket).

Prints the backing TPM (is it reachable, its epoch, restarts, reconnections, commands sent),
each node with every open file (who opened it, what its space holds), and the snapshot of an
opt-in feature (``--sessions global``'s registry).  ``--json`` prints the document as is.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from .daemon.control import default_control_path


def request(path: str, timeout: float = 10.0) -> dict[str, Any]:
    """The daemon's status document."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    doc: dict[str, Any] = json.loads(data)
    return doc


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render(doc: dict[str, Any]) -> str:
    """The document in lines a person reads."""
    tpm = doc["tpm"]
    lines = [
        f"TPM: {'reachable' if tpm['available'] else 'NOT REACHABLE (reconnecting)'}, epoch {tpm['epoch']}, "
        f"{_plural(tpm['restarts'], 'restart')}, {_plural(tpm['reconnects'], 'lost connection')}, "
        f"{_plural(tpm['commands_sent'], 'command')} sent"
    ]
    for node in doc["nodes"]:
        files = node["files"]
        lines.append(
            f"node {node['name']} (kernel {node['kernel']}, seam {node['seam']}): {_plural(len(files), 'open file')}"
        )
        if "quota" in node:  # a tenant node (serve --config)
            q = node["quota"]
            use = ", ".join(f"{k} {u}/{lim or 'any'}" for k, (u, lim) in
                            ((k, q[k]) for k in ("open", "objects", "sessions")))  # fmt: skip
            refusals = ", ".join(f"{rule} {n}" for rule, n in sorted(node["refusals"].items())) or "none"
            gone = "" if node["accepting"] else " (removed: goes when its last file closes)"
            lines.append(f"  quota: {use}; refused: {refusals}{gone}")
        for f in files:
            sessions = ", sessions " + " ".join(f["sessions"]) if f["sessions"] else ""
            state = " busy" if f["busy"] else ""
            stale = "" if f["epoch"] in (None, tpm["epoch"]) else f" (of epoch {f['epoch']}: gets EPIPE)"
            who = f"pid {f['pid']}{' (' + f['comm'] + ')' if f.get('comm') else ''} uid {f['uid']} gid {f['gid']}"
            lines.append(f"  {who}: {_plural(f['objects'], 'object')}{sessions}{state}{stale}")
    for name, snap in doc.get("features", {}).items():
        lines.append(f"{name}: {json.dumps(snap, sort_keys=True)}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="what a running daemon is doing: its TPM, nodes, open files")
    p.add_argument("--control", default=default_control_path(), metavar="PATH", help="the daemon's control socket")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")


def run_status(args: argparse.Namespace) -> int:
    try:
        doc = request(args.control)
    except (OSError, ValueError) as exc:
        print(f"cusetpm status: {args.control}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=1, sort_keys=True) if args.json else render(doc))
    return 0
