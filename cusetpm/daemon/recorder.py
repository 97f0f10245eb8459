# SPDX-License-Identifier: GPL-2.0-only
"""What the daemon sees of its files, written down as a conformance scenario.

``cusetpm record`` installs a :class:`Recorder` on a node; every open, write, read, poll and
close of every file is then one line of the scenario language
(cusetpm/conformance/corpus/README.md), in the order the daemon saw them, so the scenario can
be replayed against the real kernels.  Nothing is lost, as with strace, because nothing is
guessed: these are the calls that reached the node.  An O_NONBLOCK change seen at a write
(CUSE passes the flag with every call, as the kernel reads it at each write) becomes a
``setfl`` line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .file import DeviceFile

#: How long a replayed poll() that would wait (the client asked to be woken) waits.
POLL_WAIT_MS = 1000


class Recorder:
    """Collects scenario lines; :meth:`scenario` gives the text."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._names: dict[int, str] = {}
        self._nonblock: dict[int, bool] = {}
        self._opened = 0

    def _name(self, f: DeviceFile) -> str:
        return self._names[id(f)]

    def opened(self, f: DeviceFile, flags: int) -> None:
        n, name = self._opened, ""
        while True:
            name = chr(ord("a") + n % 26) + name
            n = n // 26 - 1
            if n < 0:
                break
        self._opened += 1
        self._names[id(f)] = name
        self._nonblock[id(f)] = bool(flags & os.O_NONBLOCK)
        words = ["open", name]
        access = flags & os.O_ACCMODE
        if access == os.O_RDONLY:
            words.append("rdonly")
        elif access == os.O_WRONLY:
            words.append("wronly")
        if flags & os.O_NONBLOCK:
            words.append("nonblock")
        self.lines.append(" ".join(words))

    def _mode(self, f: DeviceFile, nonblock: bool) -> None:
        if self._nonblock[id(f)] != nonblock:
            self._nonblock[id(f)] = nonblock
            self.lines.append(f"setfl {self._name(f)} {'nonblock' if nonblock else 'block'}")

    def wrote(self, f: DeviceFile, data: bytes, nonblock: bool) -> None:
        self._mode(f, nonblock)
        self.lines.append(f"write {self._name(f)} {data.hex()}".rstrip())

    def read(self, f: DeviceFile, size: int) -> None:
        self.lines.append(f"read {self._name(f)} {size}")

    def polled(self, f: DeviceFile, waits: bool) -> None:
        """A poll that asked to be woken is replayed as a wait for a response."""
        self.lines.append(f"poll {self._name(f)} in {POLL_WAIT_MS}" if waits else f"poll {self._name(f)}")

    def closed(self, f: DeviceFile) -> None:
        self.lines.append(f"close {self._name(f)}")

    def scenario(self, name: str, header: str = "") -> str:
        head = [f"# {line}" for line in header.splitlines()]
        return "\n".join([*head, f"scenario {name}", *self.lines]) + "\n"
