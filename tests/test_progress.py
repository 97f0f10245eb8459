# SPDX-License-Identifier: GPL-2.0-only
"""Progress lines (cusetpm/progress.py): plain lines off a terminal, one line redrawn in place
on one (a real pty), quiet by flag or by environment, the download bar, and marker lines from
a guest turned into progress lines.  The last tests drive the rig's own progress code
(cusetpm/rig/qemu.py, kernels.py) with a stand-in for qemu and for apt-get: tests/test_rig.py
boots real guests, and those are marked ``guest``."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cusetpm import progress
from cusetpm.progress import ENV_QUIET, MARKER, Relay, Reporter

DONE = r"done in \d+\.\d s"


@pytest.fixture(autouse=True)
def _no_quiet_env():
    """Every test starts loud and leaves the process-wide reporter and the environment as it
    found them (``configure(quiet=True)`` exports the variable)."""
    saved = os.environ.pop(ENV_QUIET, None)
    yield
    progress.configure()
    os.environ.pop(ENV_QUIET, None)
    if saved is not None:
        os.environ[ENV_QUIET] = saved


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


# ---- off a terminal: plain full lines


def test_a_stage_off_a_terminal_is_a_start_line_and_a_done_line():
    buf = io.StringIO()
    r = Reporter(buf)
    with r.stage("[6.12] booting guest"):
        r.note("[6.12] scenario 1/2 a 0.1 s")
    out = lines(buf)
    assert out[:2] == ["cusetpm: [6.12] booting guest ...", "cusetpm: [6.12] scenario 1/2 a 0.1 s"]
    assert re.fullmatch(rf"cusetpm: \[6\.12\] booting guest: {DONE}", out[2])
    assert len(out) == 3 and "\r" not in buf.getvalue()


def test_a_stage_left_by_an_exception_says_failed_and_the_exception_goes_on():
    buf = io.StringIO()
    r = Reporter(buf)
    with pytest.raises(RuntimeError), r.stage("extracting"):
        raise RuntimeError("boom")
    assert re.fullmatch(r"cusetpm: extracting: failed after \d+\.\d s", lines(buf)[-1])


def test_a_stage_finished_by_hand_reports_once():
    buf = io.StringIO()
    r = Reporter(buf)
    st = r.stage("booting")
    st.finish()
    st.finish(ok=False)
    with st:
        pass
    assert len(lines(buf)) == 2 and "done in" in lines(buf)[1]


def test_a_bar_off_a_terminal_is_at_most_four_lines():
    buf = io.StringIO()
    r = Reporter(buf)
    total = 68_600_000
    for done in range(0, total + 1, total // 50):
        r.bar(done, total, "[6.1] downloading linux-image")
    r.bar(total, total, "[6.1] downloading linux-image")
    assert lines(buf) == [f"cusetpm: [6.1] downloading linux-image: {p}% of 68.6 MB" for p in (25, 50, 75, 100)]


def test_a_bar_of_unknown_size_is_one_line():
    buf = io.StringIO()
    r = Reporter(buf)
    for done in (0, 10, 20):
        r.bar(done, None, "fetching")
    assert lines(buf) == ["cusetpm: fetching ..."]


def test_sizes_read_as_people_write_them():
    assert [progress.human_size(n) for n in (999, 12_300, 68_600_000, 2e9)] == ["999 B", "12.3 kB", "68.6 MB", "2.0 GB"]


# ---- on a terminal: a status line redrawn in place


class Pty:
    """A real terminal: the reporter writes to the slave side, the test reads the master."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.stream = open(self.slave, "w", closefd=False)
        self.data = b""

    def read(self) -> str:
        """All written so far: until nothing came for 0.2 s (or 2 s went by, with a ticker)."""
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and select.select([self.master], [], [], 0.2)[0]:
            self.data += os.read(self.master, 65536)
        return self.data.decode()

    def close(self) -> None:
        self.stream.close()
        os.close(self.slave)
        os.close(self.master)


@pytest.fixture
def pty():
    p = Pty()
    yield p
    p.close()


def test_a_stage_on_a_terminal_is_one_line_rewritten_with_its_elapsed_time(pty):
    r = Reporter(pty.stream, tick=0.05)
    assert r.isatty()
    with r.stage("[6.12] booting guest"):
        time.sleep(0.3)
        pty.read()
        r.note("[6.12] scenario 1/1 a 0.1 s")
    out = pty.read()
    assert "\r" in out and "cusetpm: [6.12] booting guest ... 0 s" in out  # the elapsed counter
    assert out.count("booting guest ... 0 s") >= 3  # redrawn by the ticker, not only at start
    # what stays on the screen: each line's text after its last carriage return
    screen = [line.rsplit("\r", 1)[-1] for line in out.split("\r\n") if line.rsplit("\r", 1)[-1]]
    assert screen[0] == "cusetpm: [6.12] scenario 1/1 a 0.1 s"
    assert re.fullmatch(rf"cusetpm: \[6\.12\] booting guest: {DONE}", screen[1])
    assert len(screen) == 2, screen  # no plain start line, no status line left behind


def test_a_bar_on_a_terminal(pty):
    r = Reporter(pty.stream)
    r.bar(5_000_000, 10_000_000, "downloading k")
    out = pty.read()
    assert "\rcusetpm: downloading k [############............]  50% 5.0 MB/10.0 MB" in out
    r.bar(10_000_000, 10_000_000, "downloading k")
    assert pty.read().endswith("\rcusetpm: downloading k: 10.0 MB\r\n")


def test_a_bar_inside_a_stage_gives_way_to_the_stage_line(pty):
    r = Reporter(pty.stream)
    with r.stage("downloading k (10.0 MB)"):
        r.bar(2_500_000, 10_000_000, "downloading k")
        assert "[######" in pty.read()
        r.bar(10_000_000, 10_000_000, "downloading k")
    screen = pty.read().split("\r\n")[-2].rsplit("\r", 1)[-1]
    assert re.fullmatch(rf"cusetpm: downloading k \(10\.0 MB\): {DONE}", screen)
    assert "10.0 MB/10.0 MB" not in pty.data.decode()  # the finished bar was not drawn as a line


# ---- quiet


def test_quiet_prints_nothing():
    buf = io.StringIO()
    r = Reporter(buf, quiet=True)
    with r.stage("booting"):
        r.note("a note")
        r.bar(50, 100, "dl")
        r.bar(100, 100, "dl")
    assert buf.getvalue() == ""


def test_the_environment_makes_it_quiet(monkeypatch):
    buf = io.StringIO()
    r = Reporter(buf)
    monkeypatch.setenv(ENV_QUIET, "1")
    r.note("hidden")
    monkeypatch.setenv(ENV_QUIET, "0")
    r.note("shown")
    assert lines(buf) == ["cusetpm: shown"]


def _child_stderr() -> str:
    code = "from cusetpm import progress; progress.note('from the child')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_configure_quiet_is_inherited_by_child_processes(capsys):
    assert _child_stderr() == "cusetpm: from the child\n"
    progress.configure(quiet=True)
    assert progress.is_quiet() and os.environ[ENV_QUIET] == "1"
    progress.note("hidden")
    assert _child_stderr() == ""
    assert capsys.readouterr().err == ""


def test_the_module_writes_to_stderr_by_default(capsys):
    with progress.stage("stage"):
        progress.note("note")
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["cusetpm: stage ...", "cusetpm: note"] and "done in" in err[2]


def test_configure_sends_it_elsewhere():
    buf = io.StringIO()
    progress.configure(stream=buf)
    progress.note("here")
    assert buf.getvalue() == "cusetpm: here\n"


# ---- markers: progress from the guest


def test_a_marker_round_trips_as_one_line():
    line = progress.marker("scenario 1/2\nname 0.1 s")
    assert line == MARKER + "scenario 1/2 name 0.1 s\n"
    assert progress.parse_marker(line) == "scenario 1/2 name 0.1 s"
    assert progress.parse_marker("scenario 1/2 name") is None
    out = io.StringIO()
    progress.emit_marker("hello", stream=out)
    assert out.getvalue() == MARKER + "hello\n"


GUEST_OUTPUT = (
    "cusetpm: serving /run/cusetpm/tpmrm0\n"
    f"{MARKER}scenario 1/3 write-e2big 0.6 s (kernel 0.0 s, node 0.1 s)\n"
    "some other output, with a ü\n"
    f"{MARKER}scenario 2/3 session-flushed-by-other-file 1.2 s (kernel 0.3 s, node FAILED 0.4 s)\n"
    f"not a marker: {MARKER}\n"
    f"{MARKER}scenario 3/3 read-partial 0.5 s (kernel 0.0 s, node 0.0 s)"  # no newline: the end
)


def test_marker_lines_of_a_guest_transcript_become_progress_lines():
    buf = io.StringIO()
    relay = Relay("[6.1]", Reporter(buf))
    data = GUEST_OUTPUT.encode()
    for i in range(0, len(data), 7):  # in pieces, splitting lines and the UTF-8 of ü
        relay.feed(data[i : i + 7])
    assert len(lines(buf)) == 2  # the last marker has no newline yet
    relay.close()
    assert lines(buf) == [
        "cusetpm: [6.1] scenario 1/3 write-e2big 0.6 s (kernel 0.0 s, node 0.1 s)",
        "cusetpm: [6.1] scenario 2/3 session-flushed-by-other-file 1.2 s (kernel 0.3 s, node FAILED 0.4 s)",
        "cusetpm: [6.1] scenario 3/3 read-partial 0.5 s (kernel 0.0 s, node 0.0 s)",
    ]
    assert len(relay.seen) == 3


def test_the_output_callers_get_has_no_marker_lines():
    stripped = progress.strip_markers(GUEST_OUTPUT)
    assert stripped == (f"cusetpm: serving /run/cusetpm/tpmrm0\nsome other output, with a ü\nnot a marker: {MARKER}\n")
    assert progress.strip_markers("plain\n") == "plain\n"


# ---- the rig's progress, with stand-ins for qemu and apt-get


def test_the_rig_reports_boot_run_and_markers_as_the_guest_writes_them(tmp_path: Path):
    """``_wait_reporting`` on a process that writes like the guest: the BEGIN sentinel on the
    console, then marker lines to the output file, one second apart; each is reported when it
    is written, not when the process ends."""
    from cusetpm.rig.initramfs import _SENTINEL
    from cusetpm.rig.qemu import _wait_reporting

    console, output = tmp_path / "console.log", tmp_path / "output"
    script = (
        f"sleep 0.3; echo '{_SENTINEL}-BEGIN n0nce' >> {console}; "
        f"echo hello > {output}; sleep 0.3; echo '{MARKER}scenario 1/2 a 0.1 s' >> {output}; sleep 1; "
        f"echo '{MARKER}scenario 2/2 b 0.2 s' >> {output}"
    )
    buf = io.StringIO()
    progress.configure(stream=buf)
    proc = subprocess.Popen(["sh", "-c", script])
    seen_at: dict[str, float] = {}
    real_note = progress._REPORTER.note

    def note(text: str) -> None:
        seen_at[text] = time.monotonic()
        real_note(text)

    progress._REPORTER.note = note  # type: ignore[method-assign]
    try:
        timed_out, began, stage = _wait_reporting(proc, 30, "6.1", "n0nce", console, output)
    finally:
        del progress._REPORTER.note
    end = time.monotonic()
    stage.finish()
    assert not timed_out and began
    out = lines(buf)
    assert out[0] == "cusetpm: [6.1] booting the guest ..."
    assert re.fullmatch(rf"cusetpm: \[6\.1\] booting the guest: {DONE}", out[1])
    assert out[2:5] == [
        "cusetpm: [6.1] running in the guest ...",
        "cusetpm: [6.1] scenario 1/2 a 0.1 s",
        "cusetpm: [6.1] scenario 2/2 b 0.2 s",
    ]
    assert re.fullmatch(rf"cusetpm: \[6\.1\] running in the guest: {DONE}", out[5])
    assert end - seen_at["[6.1] scenario 1/2 a 0.1 s"] > 0.6  # reported while the process ran


def test_the_rig_times_out_with_the_stage_open(tmp_path: Path):
    from cusetpm.rig.qemu import _kill, _wait_reporting

    buf = io.StringIO()
    progress.configure(stream=buf)
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        timed_out, began, stage = _wait_reporting(proc, 0.5, "6.12", "x", tmp_path / "c", tmp_path / "o")
    finally:
        _kill(proc)
    stage.finish(ok=False)
    assert timed_out and not began
    assert re.fullmatch(r"cusetpm: \[6\.12\] booting the guest: failed after \d+\.\d s", lines(buf)[-1])


FAKE_APT = """#!/bin/bash
# a stand-in for apt-get download: the status lines apt writes on APT::Status-Fd, then the .deb
fd=$(echo "$3" | sed 's/APT::Status-Fd=//')
for p in 0.0000 10.0000 30.0000 60.0000 80.0000 100.0000; do
  echo "dlstatus:1:$p:Retrieving file 1 of 1" >&$fd
done
echo "Get:1 http://deb.debian.org/debian $4"
touch pkg.deb
"""


def test_the_kernel_download_shows_apts_progress_as_a_bar(tmp_path: Path, monkeypatch):
    from cusetpm.rig.kernels import _apt_download

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "apt-get").write_text(FAKE_APT)
    (bindir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    buf = io.StringIO()
    progress.configure(stream=buf)
    _apt_download("6.1", "linux-image-x", "1.0", 68_600_000, tmp_path)
    assert (tmp_path / "pkg.deb").exists()
    out = lines(buf)
    assert out[0] == "cusetpm: [6.1] downloading linux-image-x (68.6 MB) ..."
    assert out[1:5] == [f"cusetpm: [6.1] downloading linux-image-x: {p}% of 68.6 MB" for p in (25, 50, 75, 100)]
    assert re.fullmatch(rf"cusetpm: \[6\.1\] downloading linux-image-x \(68\.6 MB\): {DONE}", out[5])


def test_a_failed_kernel_download_is_an_error_with_apts_output(tmp_path: Path, monkeypatch):
    from cusetpm.rig.kernels import RigError, _apt_download

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    (bindir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    buf = io.StringIO()
    progress.configure(stream=buf)
    with pytest.raises(RigError, match="Unable to locate package"):
        _apt_download("6.1", "linux-image-x", "1.0", 1000, tmp_path)
    assert "failed after" in lines(buf)[-1]
