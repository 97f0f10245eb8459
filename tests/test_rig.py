# SPDX-License-Identifier: GPL-2.0-only
"""Tests of the real-kernel rig itself: these really boot Debian kernels.

Nothing here is skipped: if the rig cannot boot, these tests must fail,
because every kernel-comparison test built on the rig would be meaningless.
One boot per kernel carries most checks (each boot costs seconds under TCG).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cusetpm import progress, rig
from cusetpm.rig.kernels import _modname

pytestmark = pytest.mark.guest

SPECIAL = "a b'c\"$HOME;`x`"


@pytest.fixture(scope="module", params=rig.KERNELS)
def boot(request, tmp_path_factory):
    """One guest boot per kernel running every check; returns what it saw."""
    version = request.param
    kernel = rig.ensure_kernel(version)
    share = tmp_path_factory.mktemp(f"share-{version}")
    (share / "from-host.txt").write_text("hello-from-host\n")
    script = f"""
echo "UNAME=$(uname -r)"
echo "PROCVERSION=$(cat /proc/version)"
echo "PWD=$(pwd)"
echo "VAR=$RIG_TEST_VAR"
echo "SHARED=$(cat {share}/from-host.txt)"
echo hello-from-guest > {share}/from-guest.txt
[ -c /dev/cuse ] && echo CUSE=yes
echo to-stderr >&2
{rig.guest_swtpm_prelude()} && echo "RANDOM=$(tpm2_getrandom -T device:/dev/tpmrm0 --hex 8)"
[ -c /dev/tpmrm0 ] && echo TPMRM0=yes
{sys.executable} -m cusetpm serve --fuse /tmp/devnode --tcti device:/dev/tpm0 --control off --ready-fd 3 \
    3>/tmp/devready >/tmp/dev.log 2>&1 &
for i in $(seq 100); do [ -s /tmp/devready ] && break; sleep 0.2; done
echo "DEVRANDOM=$(tpm2_getrandom -T device:/tmp/devnode/tpmrm0 --hex 8)"
kill -TERM $! && wait $! && echo DEVSTOP=ok
echo '{progress.MARKER}a progress line from the guest'
exit 7
"""
    t0 = time.monotonic()
    lines = io.StringIO()
    progress.configure(stream=lines)
    try:
        res = rig.run_in_guest(version, script, env={"RIG_TEST_VAR": SPECIAL}, share=str(share), timeout=300)
    finally:
        progress.configure()
    print(f"\nrig boot {version}: guest {res.seconds:.1f}s, call {time.monotonic() - t0:.1f}s")
    fields = dict(re.findall(r"^([A-Z0-9]+)=(.*)$", res.output, re.M))
    fields["PROGRESS"] = lines.getvalue()
    return version, kernel, res, fields, share


def _explain(res: rig.GuestResult) -> str:
    return f"--- output ---\n{res.output}\n--- console tail ---\n{res.console[-3000:]}"


def test_uname_matches_package(boot):
    version, kernel, res, fields, _ = boot
    assert fields.get("UNAME") == kernel.release, _explain(res)
    assert kernel.release.startswith(version + ".")
    # /proc/version names the Debian package version, e.g. "Debian 6.1.192-2".
    assert f"Debian {kernel.package_version} " in fields["PROCVERSION"], _explain(res)


def test_kernel_tpmrm0_works(boot):
    _, _, res, fields, _ = boot
    assert fields.get("TPMRM0") == "yes", _explain(res)
    assert re.fullmatch(r"[0-9a-f]{16}", fields.get("RANDOM", "")), _explain(res)
    assert fields.get("CUSE") == "yes", _explain(res)


def test_a_node_on_the_kernels_own_dev_tpm0(boot):
    """``--tcti device:/dev/tpm0``, the native device backend, on the real kernel's device
    (swtpm behind vtpm_proxy)."""
    _, _, res, fields, _ = boot
    assert re.fullmatch(r"[0-9a-f]{16}", fields.get("DEVRANDOM", "")), _explain(res)
    assert fields.get("DEVSTOP") == "ok", _explain(res)


def test_exit_status_and_output(boot):
    _, _, res, fields, _ = boot
    assert res.returncode == 7, _explain(res)
    assert "to-stderr" in res.output
    assert fields.get("VAR") == SPECIAL
    assert fields.get("PWD") == os.getcwd()
    assert res.seconds > 0 and "Linux version" in res.console


def test_share_round_trip(boot):
    _, _, res, fields, share = boot
    assert fields.get("SHARED") == "hello-from-host", _explain(res)
    assert (share / "from-guest.txt").read_text() == "hello-from-guest\n", _explain(res)


def test_progress_lines_while_the_guest_runs(boot):
    """Boot and run are reported as stages, and a marker line of the command's output becomes
    a progress line (and is not part of the output)."""
    version, _, res, fields, _ = boot
    got = fields["PROGRESS"].splitlines()
    for stage in ("building the initramfs", "booting the guest", "running in the guest"):
        assert f"cusetpm: [{version}] {stage} ..." in got, got
        assert any(re.fullmatch(rf"cusetpm: \[{version}\] {stage}: done in \d+\.\d s", line) for line in got), got
    assert f"cusetpm: [{version}] a progress line from the guest" in got, got
    assert progress.MARKER not in res.output


def test_failing_command_status():
    res = rig.run_in_guest("6.12", "false", timeout=300)
    assert res.returncode == 1, res.console[-3000:]


def test_missing_sentinel_is_an_error():
    # The guest powers off before the command finishes: no result may be faked.
    with pytest.raises(rig.RigError, match="no exit-status sentinel"):
        rig.run_in_guest("6.1", "echo o > /proc/sysrq-trigger; sleep 60", timeout=300)


@dataclass
class Boots:
    """What `panicking` records: one entry per boot, and the rig's progress lines."""

    panics: int = 0  # how many of the first boots panic before /init runs
    calls: list[int] = field(default_factory=list)
    lines: io.StringIO = field(default_factory=io.StringIO)


@pytest.fixture
def panicking(monkeypatch: pytest.MonkeyPatch) -> Iterator[Boots]:
    """The first `panics` boots' kernels panic before /init runs (an /init that does not
    exist: "VFS: Unable to mount root fs"), as an int3 oops under TCG does now and then."""
    from cusetpm.rig import qemu

    real = qemu._qemu_argv
    boots = Boots()

    def argv(*args, **kwargs):
        boots.calls.append(1)
        if len(boots.calls) <= boots.panics:
            kwargs["append_extra"] = "rdinit=/no-such-init"
        return real(*args, **kwargs)

    monkeypatch.setattr(qemu, "_qemu_argv", argv)
    progress.configure(stream=boots.lines)
    yield boots
    progress.configure()


def test_a_kernel_that_panics_while_booting_is_booted_again(panicking):
    panicking.panics = 1
    res = rig.run_in_guest("6.12", "echo ran-once", timeout=300)
    said = panicking.lines.getvalue()
    got = (res.returncode, res.output.strip(), res.boots, len(panicking.calls))
    assert got == (0, "ran-once", 2, 2), _explain(res)
    assert "the guest kernel panicked while booting (Kernel panic - not syncing: VFS: Unable to mount root fs" in said
    assert "booting again" in said


def test_a_kernel_that_panics_at_every_boot_fails_after_the_last_attempt(panicking):
    panicking.panics = 99
    with pytest.raises(rig.RigError) as info:
        rig.run_in_guest("6.1", "echo never", timeout=300)
    first = str(info.value).splitlines()[0]
    assert first.startswith(
        f"rig: the guest kernel panicked before the command began, in all {rig.BOOT_ATTEMPTS} boots"
    )
    assert "Unable to mount root fs" in first
    assert len(panicking.calls) == rig.BOOT_ATTEMPTS == 3
    assert "console tail" in str(info.value)


def test_a_panic_after_the_command_began_is_not_booted_again(panicking):
    # The command ran (it may have done something): its crash is its result, once.
    with pytest.raises(rig.RigError, match="no exit-status sentinel") as info:
        rig.run_in_guest("6.12", "echo c > /proc/sysrq-trigger; sleep 60", timeout=300)
    assert len(panicking.calls) == 1
    assert "Kernel panic - not syncing: sysrq triggered crash" in str(info.value)


def _procs_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_timeout_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(rig.RigError, match="timed out") as info:
        rig.run_in_guest("6.12", "sleep 600", timeout=10)
    assert time.monotonic() - t0 < 60
    assert "console tail" in str(info.value)
    assert list(tmp_path.iterdir()) == [], "rig left its temp dir behind"
    assert _procs_mentioning(str(tmp_path)) == [], "rig left qemu running"


def test_module_order_has_deps_first():
    for version in rig.KERNELS:
        kernel = rig.ensure_kernel(version)
        order = [_modname(p) for p in rig.module_load_order(kernel)]
        assert "cuse" in order and "tpm_vtpm_proxy" in order
        if "fuse" in order:
            assert order.index("fuse") < order.index("cuse")
        assert order.index("9pnet") < order.index("9pnet_virtio") < order.index("9p")


def test_prelude_is_valid_shell():
    subprocess.run(["sh", "-n", "-c", rig.guest_swtpm_prelude() + " && true"], check=True)
