# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.serve: tenant nodes on one TPM through unmodified tpm2-tools, their quotas, reload,
audit and metrics (``serve --config``)."""

from __future__ import annotations

import errno
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TWO_TENANTS, StartTenants, Tenants
from helpers import free_port, scrape

#: Tenant A's audit trail and capture go to files the test names.
TWO = TWO_TENANTS.replace("pcrs = [16]\n", 'pcrs = [16]\naudit = "{audit}"\naudit_pcapng = "{pcap}"\n', 1)


def tool(t: Tenants, node: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TPM2TOOLS_TCTI": f"device:{t.nodes[node]}"}
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def ok(t: Tenants, node: str, *argv: str, cwd: Path) -> str:
    r = tool(t, node, *argv, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(argv)} on {node}: {r.stderr}\n{t.log()}"
    return r.stdout


def refused(t: Tenants, node: str, code: str, *argv: str, cwd: Path) -> None:
    r = tool(t, node, *argv, cwd=cwd)
    assert r.returncode != 0 and code in r.stderr.lower(), f"{' '.join(argv)} on {node}: {r.stderr}"


def test_two_tenants_on_one_tpm_each_in_its_own_ranges(tenants: StartTenants, tmp_path: Path) -> None:
    audit = tmp_path / "a.jsonl"
    port = free_port()
    pcap = tmp_path / "a.pcapng"
    t = tenants(TWO.format(audit=audit, pcap=pcap), f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    zero = "sha256=" + "00" * 32
    # Each tenant can do everything in its own ranges.
    ok(t, "tenant-b", "tpm2_nvdefine", "0x01500110", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite", cwd=tmp_path)
    (tmp_path / "b.dat").write_bytes(b"tenant-b")
    ok(t, "tenant-b", "tpm2_nvwrite", "0x01500110", "-C", "o", "-i", "b.dat", cwd=tmp_path)
    ok(t, "tenant-a", "tpm2_nvdefine", "0x01500010", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite", cwd=tmp_path)
    ok(t, "tenant-a", "tpm2_nvwrite", "0x01500010", "-C", "o", "-i", "b.dat", cwd=tmp_path)
    assert ok(t, "tenant-a", "tpm2_nvread", "0x01500010", "-C", "o", "-s", "8", cwd=tmp_path) == "tenant-b"
    ok(t, "tenant-a", "tpm2_createprimary", "-C", "o", "-c", "a.ctx", cwd=tmp_path)
    ok(t, "tenant-a", "tpm2_evictcontrol", "-C", "o", "-c", "a.ctx", "0x81000100", cwd=tmp_path)
    ok(t, "tenant-a", "tpm2_pcrextend", f"16:{zero}", cwd=tmp_path)
    pcr23 = ok(t, "tenant-b", "tpm2_pcrread", "sha256:23", cwd=tmp_path)
    # Tenant A cannot touch B's, nor the TPM as a whole.
    refused(t, "tenant-a", "0xb0143", "tpm2_clear", cwd=tmp_path)
    refused(t, "tenant-a", "0xb0149", "tpm2_nvread", "0x01500110", "-C", "o", "-s", "8", cwd=tmp_path)
    refused(t, "tenant-a", "0xb0149", "tpm2_nvwrite", "0x01500110", "-C", "o", "-i", "b.dat", cwd=tmp_path)
    refused(t, "tenant-a", "0xb0149", "tpm2_nvundefine", "0x01500110", "-C", "o", cwd=tmp_path)
    refused(t, "tenant-a", "0xb0149", "tpm2_nvdefine", "0x01500120", "-C", "o", "-s", "8", cwd=tmp_path)
    refused(t, "tenant-a", "0xb008b", "tpm2_evictcontrol", "-C", "o", "-c", "a.ctx", "0x81000200", cwd=tmp_path)
    refused(t, "tenant-a", "0xb0907", "tpm2_pcrextend", f"23:{zero}", cwd=tmp_path)
    refused(t, "tenant-a", "0xb0085", "tpm2_createprimary", "-C", "p", "-c", "p.ctx", cwd=tmp_path)
    # B is untouched by everything A tried.
    assert ok(t, "tenant-b", "tpm2_nvread", "0x01500110", "-C", "o", "-s", "8", cwd=tmp_path) == "tenant-b"
    assert ok(t, "tenant-b", "tpm2_pcrread", "sha256:23", cwd=tmp_path) == pcr23
    handles = ok(t, "tenant-b", "tpm2_getcap", "handles-persistent", cwd=tmp_path)
    assert "0x81000100" in handles and "0x81000200" not in handles
    # A's refusals are in its audit trail, with who asked ...
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    refusals = {(e["cc"], e["decision"], e["rc"]) for e in entries if e["decision"] != "allowed"}
    assert ("Clear", "refused:deny", "0x000b0143") in refusals
    assert ("NV_ReadPublic", "refused:nv", "0x000b0149") in refusals  # what tpm2_nvread/write/undefine ask first
    assert ("NV_DefineSpace", "refused:nv", "0x000b0149") in refusals
    assert ("EvictControl", "refused:persistent", "0x000b008b") in refusals
    assert ("PCR_Extend", "refused:pcrs", "0x000b0907") in refusals
    clear = next(e for e in entries if e["cc"] == "Clear")
    assert clear["comm"] == "tpm2_clear" and clear["uid"] == os.getuid() and clear["backend_commands"] == 0
    assert {e["node"] for e in entries} == {"tenant-a"}
    # ... and in its capture, which Wireshark's TPM dissector decodes, one command per entry.
    fields = subprocess.run(["tshark", "-r", str(pcap), "-Y", "tpm.req.cc", "-T", "fields", "-e", "tpm.req.cc"],
                            capture_output=True, text=True, timeout=60, check=True).stdout.split()  # fmt: skip
    assert len(fields) == len(entries) and int(fields[[e["cc"] for e in entries].index("Clear")], 0) == 0x126
    # ... and in its metrics; B has none.
    samples = scrape(port)
    assert 'cusetpm_refusals_total{node="tenant-a",rule="nv"}' in samples
    assert samples['cusetpm_refusals_total{node="tenant-a",rule="deny"}'] == 1.0
    assert not [name for name in samples if 'node="tenant-b"' in name and "refusals" in name and 'rule="' in name]


def test_max_open_refuses_the_next_open_with_emfile(tenants: StartTenants) -> None:
    t = tenants('[[node]]\nname = "small"\nmax_open = 2\n')
    fds = [os.open(t.nodes["small"], os.O_RDWR) for _ in range(2)]
    try:
        with pytest.raises(OSError) as err:
            os.open(t.nodes["small"], os.O_RDWR)
        assert err.value.errno == errno.EMFILE
        os.close(fds.pop())
        fds.append(os.open(t.nodes["small"], os.O_RDWR))  # one closed: one may open again
    finally:
        for fd in fds:
            os.close(fd)


GETRANDOM = bytes.fromhex("80010000000c0000017b0008")


def transact(fd: int) -> float:
    start = time.perf_counter()
    os.write(fd, GETRANDOM)
    rsp = os.read(fd, 4096)
    assert rsp[6:10] == b"\0\0\0\0"
    return time.perf_counter() - start


def test_a_flooding_tenant_is_held_to_its_rate_and_the_other_is_not_slowed(tenants: StartTenants) -> None:
    t = tenants('[[node]]\nname = "flood"\ncommands_per_second = 40\n\n[[node]]\nname = "quiet"\n')
    quiet = os.open(t.nodes["quiet"], os.O_RDWR)
    try:
        idle = statistics.median(transact(quiet) for _ in range(60))
        stop, sent = threading.Event(), [0]

        def flood() -> None:
            fds = [os.open(t.nodes["flood"], os.O_RDWR) for _ in range(4)]
            try:
                while not stop.is_set():
                    for fd in fds:
                        transact(fd)
                        sent[0] += 1
            finally:
                for fd in fds:
                    os.close(fd)

        threads = [threading.Thread(target=flood) for _ in range(2)]
        begin = time.monotonic()
        for th in threads:
            th.start()
        busy = statistics.median(transact(quiet) for _ in range(60))
        time.sleep(max(0.0, 3.0 - (time.monotonic() - begin)))
        stop.set()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - begin
    finally:
        os.close(quiet)
    # 40/s plus the first second's burst, never an error (transact asserts rc 0).
    assert sent[0] <= 40 * elapsed + 40 + 8, (sent[0], elapsed)
    assert sent[0] >= 40 * (elapsed - 1), (sent[0], elapsed)
    assert busy <= 2 * idle + 0.0005, (busy, idle)


def test_sighup_applies_a_new_config_and_a_broken_one_changes_nothing(tenants: StartTenants, tmp_path: Path) -> None:
    t = tenants('[[node]]\nname = "one"\n\n[[node]]\nname = "two"\n')
    held = os.open(t.nodes["two"], os.O_RDWR)  # "two" is removed below while this is open
    try:
        assert transact_rc(t.nodes["one"], bytes.fromhex("80010000000c0000017b0008")) == 0
        t.rewrite('[[node]]\nname = "one"\ndeny = ["GetRandom"]\n\n[[node]]\nname = "three"\n')
        t.reload("reloaded")
        assert transact_rc(t.nodes["one"], GETRANDOM) == 0x000B0143  # the next command has the new policy
        assert os.path.exists(t.nodes["one"].parent / "three")
        assert not os.path.exists(t.nodes["two"])  # gone for new opens ...
        assert transact(held) > 0  # ... while its open file goes on
        t.config.write_text(t.config.read_text().replace('deny = ["GetRandom"]', 'deny = ["GetRandon"]'))
        line = t.reload("reload refused")
        assert "unknown TPM command name 'GetRandon'" in line
        assert transact_rc(t.nodes["one"], GETRANDOM) == 0x000B0143  # the old policy stands
        t.rewrite('[[node]]\nname = "one"\n\n[[node]]\nname = "two"\n')
        assert "node two was removed and still has open files" in t.reload("reload refused")
    finally:
        os.close(held)


def transact_rc(path: Path, cmd: bytes) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, cmd)
        return int.from_bytes(os.read(fd, 4096)[6:10], "big")
    finally:
        os.close(fd)


def test_status_shows_each_tenant_its_files_and_quota_use(tenants: StartTenants, tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    t = tenants('[[node]]\nname = "a"\nmax_open = 3\nmax_objects = 2\n\n[[node]]\nname = "b"\n',
                extra_args=["--control", str(control)])  # fmt: skip
    fd = os.open(t.nodes["a"], os.O_RDWR)
    try:
        out = subprocess.run([sys.executable, "-m", "cusetpm", "status", "--control", str(control), "--json"],
                             capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)  # fmt: skip
        assert out.returncode == 0, out.stderr
        nodes = {n["name"]: n for n in json.loads(out.stdout)["nodes"]}
        assert nodes["a"]["quota"]["open"] == [1, 3] and nodes["a"]["quota"]["objects"] == [0, 2]
        assert nodes["a"]["files"][0]["pid"] == os.getpid() and nodes["a"]["files"][0]["comm"]
        assert nodes["b"]["files"] == []
        text = subprocess.run([sys.executable, "-m", "cusetpm", "status", "--control", str(control)],
                              capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
        assert "quota: open 1/3, objects 0/2, sessions 0/any; refused: none" in text, text
    finally:
        os.close(fd)


@pytest.mark.guest
def test_tenant_nodes_as_cuse_devices_in_a_real_kernel(tmp_path: Path) -> None:
    """In a 6.12 guest: each [[node]] is its own /dev/NAME; policies apply per device; a reload
    adds a device and removes one once its last file is closed."""
    from cusetpm.rig import run_in_guest

    nodes = '[[node]]\nname = "ten-a"\n\n[[node]]\nname = "ten-b"\ndeny = []\nhierarchies = ["owner", "lockout"]\n'
    head = '[tpm]\nstate_dir = "/tmp/st"\n\n[front]\nnode = "cuse"\n\n'
    (tmp_path / "one.toml").write_text(head + nodes)
    (tmp_path / "two.toml").write_text(head + '[[node]]\nname = "ten-a"\n\n[[node]]\nname = "ten-c"\n')
    tools = "TPM2TOOLS_TCTI=device:/dev/"
    script = (
        f"cp {tmp_path}/one.toml /tmp/c.toml; "
        f"{sys.executable} -m cusetpm serve --config /tmp/c.toml --control off --ready-fd 3 3>/tmp/ready "
        ">/tmp/log 2>&1 & pid=$!; "
        "for i in $(seq 150); do [ -s /tmp/ready ] && break; sleep 0.2; done; "
        "echo devices $(ls /dev | grep ten- | tr '\\n' ' '); "
        f"{tools}ten-a tpm2_getrandom 4 --hex >/dev/null && echo a works; "
        f"{tools}ten-a tpm2_clear 2>&1 | grep -q 0xB0143 && echo a refused clear; "
        f"{tools}ten-b tpm2_clear && echo b may clear; "
        f"exec 5<>/dev/ten-b; cp {tmp_path}/two.toml /tmp/c.toml; kill -HUP $pid; "
        "for i in $(seq 100); do [ -e /dev/ten-c ] && break; sleep 0.1; done; "
        "echo after reload $(ls /dev | grep ten- | tr '\\n' ' '); "
        "exec 5<&-; for i in $(seq 100); do [ -e /dev/ten-b ] || break; sleep 0.1; done; "
        "echo after close $(ls /dev | grep ten- | tr '\\n' ' '); "
        f"{tools}ten-c tpm2_getrandom 4 --hex >/dev/null && echo c works; "
        "kill -TERM $pid; wait $pid; echo exit $?; cat /tmp/log"
    )
    result = run_in_guest("6.12", script, timeout=600, share=str(tmp_path))
    out = result.output
    assert result.returncode == 0, out
    for line in ("devices ten-a ten-b", "a works", "a refused clear", "b may clear",
                 "after reload ten-a ten-b ten-c", "after close ten-a ten-c", "c works", "exit 0"):  # fmt: skip
        assert line in out, out


def test_with_cpu_the_request_loop_pauses_its_spin_while_the_chip_is_busy(tmp_path: Path) -> None:
    """--cpu puts the managed swtpm on the loop's own CPU, so the loop must not spin while a
    command is at the TPM: pause_spin is the chip lock's state then, and nothing without it.
    A reload cannot move the daemon to another CPU."""
    import trio

    from cusetpm.daemon import TpmChip
    from cusetpm.serve import Tenants as Served
    from cusetpm.tenants.config import ConfigError, load

    cpu = max(os.sched_getaffinity(0))
    config = tmp_path / "tenants.toml"
    config.write_text(f'[front]\ncpu = {cpu}\n\n[[node]]\nname = "a"\n')
    chip = TpmChip(object())  # type: ignore[arg-type]  # never used: no command is sent
    pinned = Served(chip, load(config), "fuse")
    assert pinned.config.cpu == cpu and pinned.pause_spin is not None

    async def main() -> None:
        assert pinned.pause_spin is not None and not pinned.pause_spin()
        async with chip.lock:
            assert pinned.pause_spin()
        assert not pinned.pause_spin()

    trio.run(main)
    config.write_text('[[node]]\nname = "a"\n')
    assert Served(chip, load(config), "fuse").pause_spin is None
    with pytest.raises(ConfigError, match="cpu cannot change on reload"):
        pinned.check(load(config))


def test_on_lazy_swapping_global_and_kernel_nodes_share_one_set_of_residents() -> None:
    """One TPM, one LazySwap: a ``sessions = "global"`` node's registry runs on it, and a
    kernel-sessions node uses it alone; the chip tells each feature once."""
    from cusetpm.serve import Tenants as Serving
    from cusetpm.sessions import GlobalSessions
    from cusetpm.swap import LazySwap
    from cusetpm.tenants.config import parse

    config = parse('[tpm]\nswap = "lazy"\n\n[[node]]\nname = "a"\nsessions = "global"\n\n[[node]]\nname = "b"\n')
    serving = Serving(None, config, "fuse")  # type: ignore[arg-type]
    glob, plain = serving.seam_for(config.nodes[0]), serving.seam_for(config.nodes[1])
    assert isinstance(glob, GlobalSessions) and isinstance(plain, LazySwap)
    assert glob.swap is plain and glob.features == (glob, plain)
    assert serving.seam_for(config.nodes[0]) is glob


def test_a_socket_backend_gets_one_spin_for_the_daemon_as_long_as_spin_us(tmp_path: Path) -> None:
    """serve gives a swtpm or simulator backend its spin for the answer (cusetpm.backends.spin),
    spin_us long, the chip's ``alone`` to ask; one for all nodes; none with spin_us 0 or for
    another backend."""
    from types import SimpleNamespace

    from cusetpm.backends.socket import SocketBackend
    from cusetpm.serve import Tenants as Served
    from cusetpm.tenants.config import load

    config = tmp_path / "tenants.toml"
    config.write_text('[front]\nspin_us = 40\n\n[[node]]\nname = "a"\n\n[[node]]\nname = "b"\n')
    backend = SocketBackend("127.0.0.1", 1)
    chip = SimpleNamespace(backend=backend, alone=lambda: True)
    served = Served(chip, load(config), "cuse")  # type: ignore[arg-type]
    spin = served._spin_wait()
    assert spin is not None and spin is backend.spin_wait and served._spin_wait() is spin
    assert spin.seconds == pytest.approx(40e-6) and spin.alone is chip.alone
    config.write_text('[front]\nspin_us = 0\n\n[[node]]\nname = "a"\n')
    off = SimpleNamespace(backend=SocketBackend("127.0.0.1", 1), alone=lambda: True)
    assert Served(off, load(config), "cuse")._spin_wait() is None  # type: ignore[arg-type]
    other = SimpleNamespace(backend=object(), alone=lambda: True)
    assert Served(other, load(config), "cuse")._spin_wait() is None  # type: ignore[arg-type]
