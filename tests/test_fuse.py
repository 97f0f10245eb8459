# SPDX-License-Identifier: GPL-2.0-only
"""The FUSE front end's own rules (the node's behaviour is tested through it elsewhere)."""

import errno
import functools

import pytest
import trio


def serve_one_node(tmp_path, body, serve_fuse=None, **serve_kw) -> None:
    """A node on a managed swtpm, its FUSE file served in ``tmp_path/mnt`` (by ``serve_fuse``,
    the channel's by default; ``serve_kw``: more of its arguments), while ``body(node)`` runs."""
    from cusetpm.backends import managed_swtpm
    from cusetpm.daemon import Node, TpmChip
    from cusetpm.frontends import fuse
    from cusetpm.kernel.profiles import PROFILES

    serve_fuse = serve_fuse or fuse.serve_fuse

    async def main() -> None:
        async with managed_swtpm(tmp_path / "state") as backend:
            chip = TpmChip(backend)
            await chip.register()
            node = Node(chip, PROFILES["6.12"])
            async with trio.open_nursery() as nursery:
                await nursery.start(chip.serve)
                await nursery.start(functools.partial(serve_fuse, node, str(tmp_path / "mnt"), **serve_kw))
                await body(node)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_open_passes_who_opened_to_the_node(tmp_path):
    """The FUSE request header's uid, gid and pid reach Node.open (a tenant policy keys on them)."""
    import os
    import threading

    from cusetpm.daemon import Opener

    async def body(node) -> None:
        def open_it() -> tuple[int, int]:
            return os.open(str(tmp_path / "mnt" / "tpmrm0"), os.O_RDWR), threading.get_native_id()

        fd, tid = await trio.to_thread.run_sync(open_it)
        try:
            (f,) = node.files
            # FUSE names the calling thread (its tid), as the kernel's current->pid.
            assert f.opener == Opener(os.getuid(), os.getgid(), tid)
        finally:
            await trio.to_thread.run_sync(os.close, fd)

    serve_one_node(tmp_path, body)


def test_the_channel_is_watched_while_it_serves(tmp_path):
    """serve_fuse tells ``watch`` of its /dev/fuse descriptor once mounted, and forgets it as it
    closes (the socket backend's spin ends for a request there: cusetpm.backends.spin)."""
    import os

    seen: list[tuple[str, int]] = []

    class Watch:
        def watch(self, fd: int) -> None:
            seen.append(("watch", fd))

        def forget(self, fd: int) -> None:
            seen.append(("forget", fd))

        def spin_until(self) -> float:
            return 0.0  # no answer due

    async def body(node) -> None:
        ((what, fd),) = seen
        assert what == "watch" and os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse"

    serve_one_node(tmp_path, body, watch=Watch())
    ((_, fd), _) = seen
    assert seen == [("watch", fd), ("forget", fd)]


def _mounts(path: str) -> int:
    with open("/proc/self/mounts") as f:
        return sum(line.split()[1] == path for line in f)


def test_a_dead_mount_left_by_kill_9_is_replaced_not_stacked(tmp_path):
    import os
    import signal

    from cusetpm.testing.daemon import start_serve, unmount

    mnt = tmp_path / "mnt"
    args = ["--fuse", str(mnt), "--state-dir", str(tmp_path / "state")]
    first = start_serve(args, log_path=tmp_path / "log1", mount=mnt)
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    try:
        with pytest.raises(OSError) as dead:
            os.statvfs(mnt)
        assert dead.value.errno == errno.ENOTCONN
        second = start_serve(args, log_path=tmp_path / "log2", mount=mnt)
        assert _mounts(str(mnt)) == 1 and "a dead FUSE mount" in second.log()
        fd = os.open(mnt / "tpmrm0", os.O_RDWR)
        os.write(fd, bytes.fromhex("80010000000c0000017b0008"))
        assert len(os.read(fd, 4096)) == 20
        os.close(fd)
        assert second.stop() == 0
        assert _mounts(str(mnt)) == 0
    finally:
        unmount(mnt)


_CLIENT = (
    "import errno, os, sys\n"
    "try:\n"
    "    fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "    os.write(fd, bytes.fromhex('80010000000c0000017b0008'))\n"
    "    print(len(os.read(fd, 4096)))\n"
    "except OSError as exc:\n"
    "    print(errno.errorcode[exc.errno])\n"
)


@pytest.mark.parametrize(
    "options,nobody_gets",
    [
        ([], "EACCES"),  # 0660 root:root
        (["--owner", "nobody"], "20"),
        (["--group", "nogroup"], "20"),
        (["--group", "nogroup", "--mode", "0600"], "EACCES"),
        (["--mode", "0666"], "20"),
    ],
)
def test_mode_owner_and_group_decide_who_may_open_the_fuse_file(tmp_path, options, nobody_gets):
    """Checked by the kernel (default_permissions) against the file's mode, owner and group;
    a client run as ``nobody`` with setpriv."""
    import os
    import subprocess
    import sys
    import tempfile

    from cusetpm.testing.daemon import start_serve, unmount

    assert os.getuid() == 0, "this test needs root: it serves to another user (allow_other) and runs a client as nobody"
    base = tempfile.mkdtemp(prefix="cusetpm-perm-", dir="/tmp")
    os.chmod(base, 0o755)  # nobody must reach the mount point
    mnt = os.path.join(base, "mnt")
    served = start_serve(["--fuse", mnt, "--state-dir", str(tmp_path / "state"), *options], log_path=tmp_path / "log")
    try:
        node = os.path.join(mnt, "tpmrm0")
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", _CLIENT]
        got = subprocess.run([*as_nobody, node], capture_output=True, text=True, timeout=30, cwd="/")
        assert got.stdout.strip() == nobody_gets, got.stderr
        root = subprocess.run([sys.executable, "-c", _CLIENT, node], capture_output=True, text=True, timeout=30)
        assert root.stdout.strip() == "20"  # the daemon's user always may
        st = os.stat(node)
        assert (st.st_uid == 65534) == ("nobody" in options) and (st.st_gid == 65534) == ("nogroup" in options)
    finally:
        assert served.stop() == 0
        unmount(mnt)
        os.rmdir(mnt)
        os.rmdir(base)


def _loop_dies(tmp: str, when: str) -> None:
    """Serve a node whose request loop raises ``when``; print how serve_fuse ended, and what
    the client saw (run in a child, so that a hang is a timeout, not a stuck suite)."""
    import pathlib
    import sys

    class Bug(RuntimeError):
        pass

    armed = [when == "start"]

    class Watch:
        def watch(self, fd: int) -> None:
            pass

        def forget(self, fd: int) -> None:
            pass

        def spin_until(self) -> float:
            if armed[0]:
                raise Bug("a bug in the request loop")
            return 0.0

    async def body(node) -> None:
        armed[0] = True  # the loop dies once it has answered the client's open
        client = [sys.executable, "-c", _CLIENT, str(pathlib.Path(tmp) / "mnt" / "tpmrm0")]
        with trio.CancelScope(shield=True):  # the loop's death cancels us: hear the client out
            with trio.move_on_after(10):
                done = await trio.run_process(client, capture_stdout=True)
                print("client:", done.stdout.decode().strip(), flush=True)
        await trio.sleep_forever()

    try:
        serve_one_node(pathlib.Path(tmp), body, watch=Watch())
    except BaseExceptionGroup as failed:
        print("serve_fuse:", "Bug" if failed.subgroup(Bug) else repr(failed), flush=True)


@pytest.mark.parametrize("when", ["start", "client"])
def test_a_request_loop_that_dies_takes_serve_fuse_down_with_its_error(tmp_path, when):
    """A bug that raises in the request loop ends serve_fuse with that error, and leaves no
    mount and no client waiting, instead of hanging: the stat that checks the mount at start,
    or a client's request, would wait for ever for a loop that is gone."""
    import os
    import subprocess
    import sys

    from cusetpm.testing.daemon import unmount

    code = f"import test_fuse; test_fuse._loop_dies({str(tmp_path)!r}, {when!r})"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=os.path.dirname(__file__), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        unmount(tmp_path / "mnt")  # what a hang, killed, would leave
    expected = ["serve_fuse: Bug"] if when == "start" else ["client: ECONNABORTED", "serve_fuse: Bug"]
    assert done.stdout.splitlines() == expected, done.stderr[-2000:]
    assert _mounts(str(tmp_path / "mnt")) == 0
