# SPDX-License-Identifier: GPL-2.0-only
"""Progress lines on stderr for the long operations (kernel download, initramfs, guest boot,
each scenario), so that a run of several minutes is not silent.

On a terminal a stage is one line, rewritten in place with its elapsed time and finished with
a newline, and a download is a bar; otherwise each is a few plain lines, which logs keep.
``configure(quiet=True)`` or ``CUSETPM_QUIET=1`` in the environment (which a child process
inherits) prints nothing.  Errors are not reported here: they are the caller's.

A process that cannot reach this terminal (the in-guest driver, whose output the rig reads
from a file) writes :func:`marker` lines instead, and :class:`Relay` turns them into lines
here.  Standard library only: the rig and the CLIs import it, ``cusetpm serve`` does not.
"""

from __future__ import annotations

import codecs
import os
import sys
import threading
import time
from typing import TextIO

__all__ = [
    "ENV_QUIET",
    "MARKER",
    "Reporter",
    "Stage",
    "Relay",
    "configure",
    "is_quiet",
    "stage",
    "note",
    "bar",
    "marker",
    "emit_marker",
    "parse_marker",
    "strip_markers",
    "human_size",
]

#: Set to 1 to silence every progress line (also in child processes).
ENV_QUIET = "CUSETPM_QUIET"
#: How a marker line starts: a progress line from a process that has no terminal.
MARKER = "@@cusetpm-progress "
_PREFIX = "cusetpm: "
_BAR_WIDTH = 24
_REDRAW_EVERY = 0.1  # seconds between two bar redraws on a terminal


def _env_quiet() -> bool:
    return os.environ.get(ENV_QUIET, "").strip().lower() not in ("", "0", "false", "no")


def human_size(n: float) -> str:
    """A byte count for people: 1476 B, 12.3 kB, 68.6 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


class Stage:
    """A stage being reported: started when created, finished by ``with`` or :meth:`finish`
    (which may be called more than once; only the first counts)."""

    def __init__(self, reporter: Reporter, text: str) -> None:
        self.reporter = reporter
        self.text = text
        self.start = time.monotonic()
        self.finished = False
        reporter._begin(self)

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def finish(self, ok: bool = True) -> None:
        """Print the stage as done (or failed) with its elapsed time."""
        if not self.finished:
            self.finished = True
            self.reporter._end(self, ok)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finish(ok=exc_type is None)


class Reporter:
    """Writes progress to a stream (default: ``sys.stderr`` at the time of writing).

    On a terminal the last line is a status line (the newest unfinished stage, or a bar) that
    is redrawn in place; finished stages and notes are printed above it.
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False, tick: float = 1.0) -> None:
        self._stream = stream
        self._quiet = quiet
        self.tick = tick  # seconds between two redraws of a stage's elapsed counter
        self._lock = threading.RLock()
        self._stages: list[Stage] = []
        self._bar: tuple[str, float, float | None] | None = None
        self._bar_drawn = 0.0
        self._quarters: dict[str, tuple[int, float]] = {}  # bar text -> (quarters printed, bytes)
        self._status_len = 0  # characters of the status line on screen, 0 if none
        self._ticker: threading.Thread | None = None
        self._wake = threading.Event()

    # ---- configuration

    def configure(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        with self._lock:
            self._quiet = quiet
            self._stream = stream
            if quiet:
                os.environ[ENV_QUIET] = "1"

    @property
    def quiet(self) -> bool:
        return self._quiet or _env_quiet()

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError, OSError):
            return False

    # ---- the public calls

    def stage(self, text: str) -> Stage:
        return Stage(self, text)

    def note(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self._line(text)

    def bar(self, done: float, total: float | None, text: str) -> None:
        """``done`` of ``total`` bytes; call again with ``done >= total`` when finished."""
        if self.quiet:
            return
        finished = bool(total) and done >= (total or 0)
        with self._lock:
            if self.isatty():
                self._bar = None if finished else (text, done, total)
                now = time.monotonic()
                if finished or now - self._bar_drawn >= _REDRAW_EVERY:
                    self._bar_drawn = now
                    if finished and not self._stages:
                        self._line(f"{text}: {human_size(total or done)}")
                    else:
                        self._draw()
                return
            if not total:
                if text not in self._quarters:
                    self._quarters[text] = (0, done)
                    self._line(f"{text} ...")
                return
            q = min(4, int(4 * done // total))
            last_q, last_done = self._quarters.get(text, (0, 0.0))
            if done < last_done:
                last_q = 0  # the same text again: a new download
            self._quarters[text] = (max(q, last_q), done)
            if q > last_q:
                self._line(f"{text}: {25 * q}% of {human_size(total)}")

    # ---- stages

    def _begin(self, st: Stage) -> None:
        if self.quiet:
            return
        with self._lock:
            self._stages.append(st)
            if self.isatty():
                self._draw()
                if self._ticker is None:
                    self._ticker = threading.Thread(target=self._tick, name="cusetpm-progress", daemon=True)
                    self._ticker.start()
            else:
                self._write(f"{_PREFIX}{st.text} ...\n")

    def _end(self, st: Stage, ok: bool) -> None:
        with self._lock:
            if st not in self._stages:
                return  # begun while quiet
            self._stages.remove(st)
            self._bar = None
            outcome = "done in" if ok else "failed after"
            self._line(f"{st.text}: {outcome} {st.seconds():.1f} s")
            if not self._stages:
                self._wake.set()

    def _tick(self) -> None:
        """The elapsed counter of the newest stage, on a terminal."""
        while True:
            self._wake.wait(self.tick)
            with self._lock:
                self._wake.clear()
                if not self._stages:
                    self._ticker = None
                    return
                if self._bar is None:
                    self._draw()

    # ---- output

    def _write(self, data: str) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # progress must never break the operation it reports on

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        return max(20, columns - 1) if columns > 0 else 79  # 0: a terminal that does not say

    def _status(self) -> str:
        if self._bar is not None:
            text, done, total = self._bar
            if not total:
                return f"{text} {human_size(done)}"
            frac = min(1.0, max(0.0, done / total))
            fill = int(frac * _BAR_WIDTH)
            bar = "#" * fill + "." * (_BAR_WIDTH - fill)
            return f"{text} [{bar}] {frac:4.0%} {human_size(done)}/{human_size(total)}"
        if self._stages:
            st = self._stages[-1]
            return f"{st.text} ... {int(st.seconds())} s"
        return ""

    def _draw(self) -> None:
        """Redraw the status line in place (terminal only)."""
        text = self._status()
        line = (_PREFIX + text)[: self._width()] if text else ""
        pad = " " * max(0, self._status_len - len(line))
        self._write(f"\r{line}{pad}" + ("\r" + line if pad else ""))
        self._status_len = len(line)

    def _line(self, text: str) -> None:
        """A permanent line: above the status line on a terminal."""
        if not self.isatty():
            self._write(f"{_PREFIX}{text}\n")
            return
        clear = "\r" + " " * self._status_len + "\r" if self._status_len else ""
        self._status_len = 0
        self._write(f"{clear}{_PREFIX}{text}\n")
        if self._stages or self._bar is not None:
            self._draw()


#: The process-wide reporter the module functions use.
_REPORTER = Reporter()


def configure(quiet: bool = False, stream: TextIO | None = None) -> None:
    """Set up the process-wide reporter (``stream`` None: ``sys.stderr``).

    ``quiet`` also exports ``CUSETPM_QUIET=1`` so child processes stay quiet; with that
    variable set, progress is quiet whatever ``quiet`` says.
    """
    _REPORTER.configure(quiet=quiet, stream=stream)


def is_quiet() -> bool:
    return _REPORTER.quiet


def stage(text: str) -> Stage:
    """Report a stage: ``with progress.stage("[6.12] booting guest"): ...``."""
    return _REPORTER.stage(text)


def note(text: str) -> None:
    """One progress line."""
    _REPORTER.note(text)


def bar(done: float, total: float | None, text: str) -> None:
    """A download of ``total`` bytes (None: unknown): a bar on a terminal, at most four lines
    otherwise.  Inside a stage, the finished bar gives way to the stage's own line."""
    _REPORTER.bar(done, total, text)


# ---- markers: progress from a process without a terminal (the guest)


def marker(text: str) -> str:
    """The marker line (with its newline) that stands for progress line ``text``."""
    return MARKER + " ".join(text.split()) + "\n"


def emit_marker(text: str, stream: TextIO | None = None) -> None:
    """Write a marker line to ``stream`` (default stdout) and flush it, so that it can be
    seen while the process still runs."""
    out = stream if stream is not None else sys.stdout
    out.write(marker(text))
    out.flush()


def parse_marker(line: str) -> str | None:
    """The progress text of a marker line, or None if it is not one."""
    line = line.rstrip("\r\n")
    return line[len(MARKER) :] if line.startswith(MARKER) else None


def strip_markers(text: str) -> str:
    """``text`` without its marker lines: the output the process would have given without."""
    if MARKER not in text:
        return text
    return "".join(line for line in text.splitlines(keepends=True) if parse_marker(line) is None)


class Relay:
    """Turns the marker lines of a stream read in pieces into progress lines with a label,
    e.g. ``[6.12]``; the rest of the stream is ignored."""

    def __init__(self, label: str = "", reporter: Reporter | None = None) -> None:
        self.label = label
        self.reporter = reporter if reporter is not None else _REPORTER
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self.seen: list[str] = []  # every progress text relayed, for tests and callers

    def feed(self, data: bytes | str) -> None:
        """Add what was read; every complete marker line becomes a progress line."""
        text = self._decoder.decode(data) if isinstance(data, bytes) else data
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._relay(line)

    def close(self) -> None:
        """The stream ended: a last marker without its newline counts too."""
        self._partial += self._decoder.decode(b"", final=True)
        if self._partial:
            self._relay(self._partial)
            self._partial = ""

    def _relay(self, line: str) -> None:
        text = parse_marker(line)
        if text is not None:
            self.seen.append(text)
            self.reporter.note(f"{self.label} {text}" if self.label else text)
