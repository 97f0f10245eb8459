# SPDX-License-Identifier: GPL-2.0-only
"""The kernel's own TPM selftests (tools/testing/selftests/tpm2) against a cusetpm node.

The tests are not part of this repository: the first run takes them from Debian's
``linux-source-6.1`` package (``apt-get download``, ``dpkg -x``, and only the tpm2 selftest
directory out of the source tarball) and keeps them in ``~/.cache/cusetpm/``; later runs
use the cached copy.  They are run unchanged, as the kernel's test_smoke.sh and
test_space.sh run them: ``python3 -m unittest -v tpm2_tests.<Class>``.

tpm2.py opens the hard-coded paths ``/dev/tpmrm0`` (``Client.FLAG_SPACE``) and ``/dev/tpm0``
(no flag).  Each run happens in a private mount namespace (``unshare --mount``) whose /dev is
a fresh tmpfs holding the few device nodes Python needs, bind-mounted from the real /dev,
plus the two TPM paths, bind-mounted from the cusetpm node; nothing of that is seen
outside the namespace, and the host's /dev is never written to.

``/dev/tpm0``, the raw TPM without a resource manager, is the cusetpm node too, so
SmokeTest (and AsyncTest's first test) run through the resource manager.  That is the
honest choice here: cusetpm serves only a resource-manager node, and a raw pass-through
device would be a second device (not cusetpm) whose test would be a test of swtpm.  The
kernel's /dev/tpm0 and /dev/tpmrm0 share their whole write/read/poll path
(tpm-dev-common.c) and differ only in the space; SmokeTest creates, uses and flushes its
own objects and sessions and asserts nothing about physical handles, so it checks that
shared path unchanged.
"""

from __future__ import annotations

import ast
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import StartDaemon

SOURCE_PACKAGE = "linux-source-6.1"
SELFTEST_SUBDIR = "tools/testing/selftests/tpm2"
CLASSES = ("SmokeTest", "SpaceTest", "AsyncTest")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cusetpm"


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)


def _extract_selftests(target: Path) -> None:
    """Download the Debian source package and extract the tpm2 selftests into ``target``."""
    work = Path(tempfile.mkdtemp(prefix="kselftest-", dir=target.parent))
    try:
        got = _run(["apt-get", "download", SOURCE_PACKAGE], work)
        if got.returncode != 0:  # no package lists yet on this machine
            _run(["apt-get", "update", "-qq"], work)
            got = _run(["apt-get", "download", SOURCE_PACKAGE], work)
        assert got.returncode == 0, f"apt-get download {SOURCE_PACKAGE} failed:\n{got.stdout}{got.stderr}"
        (deb,) = work.glob(f"{SOURCE_PACKAGE}_*.deb")
        unpacked = work / "deb"
        got = _run(["dpkg", "-x", str(deb), str(unpacked)], work)
        assert got.returncode == 0, f"dpkg -x {deb} failed:\n{got.stderr}"
        (tarball,) = unpacked.glob(f"usr/src/{SOURCE_PACKAGE}.tar.*")
        src = work / "src"
        src.mkdir()
        got = _run(["tar", "-xf", str(tarball), "-C", str(src), "--wildcards", f"*/{SELFTEST_SUBDIR}/*"], work)
        assert got.returncode == 0, f"tar -xf {tarball} failed:\n{got.stderr}"
        (tests,) = src.glob(f"*/{SELFTEST_SUBDIR}")
        (tests / "SOURCE").write_text(f"{deb.name}\n")
        tests.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def selftests() -> Path:
    """The kernel's tpm2 selftest directory (tpm2.py, tpm2_tests.py, test_*.sh), cached."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"kselftest-tpm2-{SOURCE_PACKAGE.removeprefix('linux-source-')}"
    with open(root / ".kselftest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be extracting right now
        if not (target / "tpm2_tests.py").is_file():
            _extract_selftests(target)
    for name in ("tpm2.py", "tpm2_tests.py", "test_smoke.sh", "test_space.sh"):
        assert (target / name).is_file(), f"{target / name} missing from {SOURCE_PACKAGE}"
    return target


def _test_methods(selftests: Path, cls: str) -> list[str]:
    tree = ast.parse((selftests / "tpm2_tests.py").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return [f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test")]


# Runs inside the private mount namespace; $1 node, $2 scratch dir, $3 python, $4 test.
NAMESPACE_SCRIPT = r"""
set -eu
node=$1 scratch=$2 python=$3 test=$4
mkdir -p "$scratch/hostdev"
mount --bind /dev "$scratch/hostdev"
mount -t tmpfs -o mode=0755,size=64k cusetpm-dev /dev
for dev in null zero full random urandom; do
    touch "/dev/$dev"
    mount --bind "$scratch/hostdev/$dev" "/dev/$dev"
done
umount "$scratch/hostdev"
ln -s /proc/self/fd /dev/fd
touch /dev/tpmrm0 /dev/tpm0
mount --bind "$node" /dev/tpmrm0
mount --bind "$node" /dev/tpm0
exec "$python" -m unittest -v "$test"
"""


def run_selftest(node: Path, selftests: Path, cls: str, scratch: Path) -> subprocess.CompletedProcess[str]:
    """``python3 -m unittest -v tpm2_tests.CLS`` with /dev/tpm0 and /dev/tpmrm0 = ``node``."""
    workdir = scratch / "cwd"  # the tests write SpaceTest.log / AsyncTest.log here
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(selftests), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NAMESPACE_SCRIPT,
         "sh", str(node), str(scratch), sys.executable, f"tpm2_tests.{cls}"],
        cwd=workdir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
@pytest.mark.parametrize("cls", CLASSES)
def test_kernel_selftest(daemon: StartDaemon, selftests: Path, tmp_path: Path, cls: str, kernel: str) -> None:
    d = daemon(kernel=kernel)
    expected = _test_methods(selftests, cls)
    assert expected, f"no tests in tpm2_tests.{cls}"
    result = run_selftest(d.node, selftests, cls, tmp_path / "selftest")
    output = result.stdout + result.stderr
    shown = (
        f"unittest -v tpm2_tests.{cls} (kernel {kernel}) exited {result.returncode}:\n{output}\ndaemon log:\n{d.log()}"
    )
    assert result.returncode == 0, shown
    ran = re.search(r"^Ran (\d+) tests? in ", output, re.M)
    assert ran and int(ran.group(1)) == len(expected), shown
    assert re.search(r"^OK$", output, re.M), shown  # no failures, errors or skips
    for name in expected:
        assert re.search(rf"^{name} \(tpm2_tests\.{cls}(\.{name})?\)( \.\.\.|\n.*\.\.\.) ok$", output, re.M), shown


# --- in a guest: the real kernel's node, then the CUSE node ------------------------------------

GUEST_SCRIPT = r"""
set -u
share=$1 selftests=$2 python=$3 kernel=$4 ns_script=$5
export PYTHONPATH="$selftests" PYTHONDONTWRITEBYTECODE=1
mkdir -p "$share/kernel-cwd" "$share/cuse-cwd"
for cls in SmokeTest SpaceTest AsyncTest; do
    (cd "$share/kernel-cwd" && "$python" -m unittest -v "tpm2_tests.$cls") > "$share/kernel-$cls.txt" 2>&1
    echo $? > "$share/kernel-$cls.rc"
done
# --ready-fd: the daemon writes the node's path to fd 3 (the file "ready") once it serves.
"$python" -m cusetpm serve --cuse tpmrmcuse --kernel "$kernel" --state-dir /tmp/cusetpm-st --ready-fd 3 \
    > "$share/daemon.log" 2>&1 3> "$share/ready" &
daemon=$!
for i in $(seq 150); do [ -s "$share/ready" ] && break; sleep 0.2; done
# The namespace script replaces /dev; give it the node from outside /dev.
touch /run/cusenode && mount --bind /dev/tpmrmcuse /run/cusenode
for cls in SmokeTest SpaceTest AsyncTest; do
    (cd "$share/cuse-cwd" && unshare --mount --propagation private -- sh -c "$ns_script" sh \
        /run/cusenode "$share/ns-$cls" "$python" "tpm2_tests.$cls") > "$share/cuse-$cls.txt" 2>&1
    echo $? > "$share/cuse-$cls.rc"
done
umount /run/cusenode
kill -TERM $daemon; wait $daemon; echo $? > "$share/daemon.rc"
"""


def _assert_unittest_passed(output: str, rc: int, cls: str, expected: list[str], what: str) -> None:
    shown = f"unittest -v tpm2_tests.{cls} against {what} exited {rc}:\n{output}"
    assert rc == 0, shown
    ran = re.search(r"^Ran (\d+) tests? in ", output, re.M)
    assert ran and int(ran.group(1)) == len(expected), shown
    assert re.search(r"^OK$", output, re.M), shown


@pytest.mark.guest
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_kernel_selftests_in_a_guest_on_the_kernel_node_and_the_cuse_node(
    selftests: Path, tmp_path: Path, kernel: str
) -> None:
    """In one guest booting the real kernel: the selftests pass against its own /dev/tpmrm0
    (and /dev/tpm0), and against our CUSE node with the matching profile."""
    from cusetpm.rig import guest_swtpm_prelude, run_in_guest

    share = tmp_path / "share"
    share.mkdir()
    (share / "ns.sh").write_text(NAMESPACE_SCRIPT)
    command = (
        guest_swtpm_prelude()
        + f" && sh -c {_sh_quote(GUEST_SCRIPT)} sh {share} {selftests} {sys.executable} {kernel}"
        + f' "$(cat {share}/ns.sh)"'
    )
    result = run_in_guest(kernel, command, timeout=900, share=str(share))
    assert result.returncode == 0, result.output + result.console[-3000:]
    log = (share / "daemon.log").read_text()
    assert "serving /dev/tpmrmcuse (CUSE" in log, log
    assert (share / "daemon.rc").read_text().strip() == "0", log
    for cls in CLASSES:
        expected = _test_methods(selftests, cls)
        for target, what in (("kernel", f"the {kernel} kernel's /dev/tpmrm0"), ("cuse", f"the CUSE node ({kernel})")):
            output = (share / f"{target}-{cls}.txt").read_text()
            rc = int((share / f"{target}-{cls}.rc").read_text())
            _assert_unittest_passed(output, rc, cls, expected, what)


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
