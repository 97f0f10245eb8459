# SPDX-License-Identifier: GPL-2.0-only
"""The audit trail of tenant nodes (issue 8): the JSON line of a command, the redaction of
commands and responses (real ones from swtpm, built by hand and with tpm2-pytss's marshalling),
that no input makes redaction raise or leak, the log file's append / rotation / stdout modes,
and the pcapng capture as the real tshark decodes it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpm2_pytss.command_parser import TPM_ENCRYPTED_PARAMETER, tpm2_command, tpm2_response
from tpm2_pytss.constants import TPM2_ALG, TPMA_NV
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DATA,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
)

from cusetpm.tenants import audit
from cusetpm.tenants.audit import (
    AuditLog,
    Entry,
    PcapngWriter,
    command_name,
    entry_json,
    redact_command,
    redact_response,
)
from helpers import RawTpm

RH_OWNER = 0x40000001
RS_PW = 0x40000009
NV_INDEX = 0x01500020
CC_CREATE_PRIMARY, CC_NV_DEFINE, CC_NV_UNDEFINE, CC_NV_WRITE, CC_NV_READ = 0x131, 0x12A, 0x122, 0x137, 0x14E
CC_GET_RANDOM, CC_FLUSH = 0x17B, 0x165

OWNER_PW = b"owner-pw!"
KEY_AUTH = b"key-auth-value"
KEY_DATA = b"seal-me"
NV_AUTH = b"nv-pass"
NV_DATA = b"NV-DATA-secret"
T0 = 1_700_000_000.25


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def tpm2b(b: bytes) -> bytes:
    return u16(len(b)) + b


def command(cc: int, body: bytes, tag: int = 0x8001) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), cc) + body


def pw_session(password: bytes, attrs: int = 0x01) -> bytes:
    """An authorization area of one password session (TPM_RS_PW)."""
    s = u32(RS_PW) + tpm2b(b"") + bytes([attrs]) + tpm2b(password)
    return u32(len(s)) + s


def sensitive_create(auth: bytes, data: bytes = b"") -> bytes:
    value = TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(auth), data=TPM2B_SENSITIVE_DATA(data))
    return bytes(TPM2B_SENSITIVE_CREATE(value).marshal())


ECC_TEMPLATE = bytes(TPM2B_PUBLIC.parse("ecc256").marshal())


def create_primary(owner_pw: bytes, sensitive: bytes) -> bytes:
    body = u32(RH_OWNER) + pw_session(owner_pw) + sensitive + ECC_TEMPLATE
    body += bytes(TPM2B_DATA(b"").marshal()) + bytes(TPML_PCR_SELECTION().marshal())
    return command(CC_CREATE_PRIMARY, body, tag=0x8002)


def nv_define(auth: bytes) -> bytes:
    public = TPMS_NV_PUBLIC(
        nvIndex=NV_INDEX, nameAlg=TPM2_ALG.SHA256, attributes=TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD, dataSize=32
    )
    body = u32(RH_OWNER) + pw_session(b"") + tpm2b(auth) + bytes(TPM2B_NV_PUBLIC(nvPublic=public).marshal())
    return command(CC_NV_DEFINE, body, tag=0x8002)


def nv_write(password: bytes, data: bytes, attrs: int = 0x01) -> bytes:
    body = u32(NV_INDEX) + u32(NV_INDEX) + pw_session(password, attrs) + tpm2b(data) + u16(0)
    return command(CC_NV_WRITE, body, tag=0x8002)


def nv_read(password: bytes, size: int = len(NV_DATA)) -> bytes:
    body = u32(NV_INDEX) + u32(NV_INDEX) + pw_session(password) + u16(size) + u16(0)
    return command(CC_NV_READ, body, tag=0x8002)


def get_random(n: int) -> bytes:
    return command(CC_GET_RANDOM, u16(n))


def rc_of(rsp: bytes) -> int:
    return int(struct.unpack_from(">I", rsp, 6)[0])


def entry(cmd: bytes, rsp: bytes, **kw: object) -> Entry:
    fields: dict[str, object] = dict(
        time=T0, node="tpmrm-alice", uid=1000, gid=100, pid=4242, comm="tpm2_nvread", command=cmd,
        response=rsp, errno=None, decision="allowed", duration=0.001234, backend_commands=3,
    )  # fmt: skip
    fields.update(kw)
    return Entry(**fields)  # type: ignore[arg-type]


def diff(a: bytes, b: bytes) -> set[int]:
    assert len(a) == len(b)
    return {i for i in range(len(a)) if a[i] != b[i]}


def span(data: bytes, secret: bytes) -> set[int]:
    i = data.index(secret)
    assert data.count(secret) == 1
    return set(range(i, i + len(secret)))


def wholesale(data: bytes) -> bytes:
    return data[:10] + bytes(max(0, len(data) - 10))


# --- a real exchange with swtpm, shared by the tests below -----------------------------------


@dataclasses.dataclass
class Exchange:
    create_primary: tuple[bytes, bytes]
    nv_define: tuple[bytes, bytes]
    nv_write: tuple[bytes, bytes]
    nv_read: tuple[bytes, bytes]
    get_random: tuple[bytes, bytes]
    flush: tuple[bytes, bytes]

    def pairs(self) -> list[tuple[bytes, bytes]]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@pytest.fixture(scope="module")
def real() -> Iterator[Exchange]:
    tpm = RawTpm.start()
    try:

        def send(cmd: bytes) -> tuple[bytes, bytes]:
            rsp = tpm.send_raw(cmd)
            for _ in range(20):  # TPM_RC_RETRY / TPM_RC_YIELDED / TPM_RC_TESTING: ask again, as TSSs do
                if rc_of(rsp) not in (0x922, 0x908, 0x90A):
                    break
                rsp = tpm.send_raw(cmd)
            assert rc_of(rsp) == 0, f"0x{rc_of(rsp):x} for {cmd.hex()}"
            return cmd, rsp

        primary = send(create_primary(b"", sensitive_create(KEY_AUTH)))
        handle = struct.unpack_from(">I", primary[1], 10)[0]
        yield Exchange(
            create_primary=primary,
            nv_define=send(nv_define(NV_AUTH)),
            nv_write=send(nv_write(NV_AUTH, NV_DATA)),
            nv_read=send(nv_read(NV_AUTH)),
            get_random=send(get_random(16)),
            flush=send(command(CC_FLUSH, u32(handle))),
        )
    finally:
        tpm.close()


# --- the JSON line ---------------------------------------------------------------------------


def test_json_line_of_a_real_nv_read(real: Exchange) -> None:
    cmd, rsp = real.nv_read
    line = entry_json(entry(cmd, rsp, stream=7))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250000Z",
        "time_unix": T0,
        "node": "tpmrm-alice",
        "stream": 7,
        "uid": 1000,
        "gid": 100,
        "pid": 4242,
        "comm": "tpm2_nvread",
        "cc": "NV_Read",
        "handles": [f"0x{NV_INDEX:08x}", f"0x{NV_INDEX:08x}"],
        "rc": "0x00000000",
        "errno": None,
        "decision": "allowed",
        "duration_us": 1234,
        "backend_commands": 3,
    }
    # No bytes of the command or the response go into the line.
    assert NV_AUTH.decode() not in line and NV_DATA.decode() not in line


def test_json_line_of_a_create_primary_refused_and_of_a_failed_write(real: Exchange) -> None:
    cmd, _ = real.create_primary
    refused = json.loads(entry_json(entry(cmd, command(0, b"")[:6] + u32(0x000B0143), decision="refused:deny")))
    assert (refused["cc"], refused["handles"], refused["rc"], refused["decision"]) == (
        "CreatePrimary", ["0x40000001"], "0x000b0143", "refused:deny",
    )  # fmt: skip
    failed = json.loads(entry_json(entry(cmd, b"", errno="EINVAL", duration=0.0000004)))
    assert (failed["rc"], failed["errno"], failed["duration_us"]) == (None, "EINVAL", 0)


def test_json_cc_names_unknown_codes_and_short_writes() -> None:
    assert command_name(0x11F) == "NV_UndefineSpaceSpecial"  # not the range marker FIRST
    assert command_name(0x155) == "HMAC"  # of HMAC/MAC, the first tpm2-pytss defines
    assert command_name(0x17B) == "GetRandom"
    vendor = json.loads(entry_json(entry(command(0x20000001, u32(0x81000001) * 3), b"")))
    assert (vendor["cc"], vendor["handles"]) == ("0x20000001", [])
    short = json.loads(entry_json(entry(b"\x80\x01\x00", b"")))
    assert (short["cc"], short["handles"], short["rc"]) == (None, [], None)
    # A handle area cut short: only the handles that are there.
    cut = json.loads(entry_json(entry(nv_read(b"")[:16], b"")))
    assert (cut["cc"], cut["handles"]) == ("NV_Read", [f"0x{NV_INDEX:08x}"])


# --- redaction: what is zeroed ----------------------------------------------------------------


def test_password_session_is_zeroed_and_nothing_else() -> None:
    cmd = nv_read(b"secretpw")
    out = redact_command(cmd)
    assert diff(cmd, out) == span(cmd, b"secretpw")
    assert out == nv_read(bytes(8))  # header, handles, session handle, sizes, attrs, params kept


def test_create_primary_sensitive_and_owner_password_are_zeroed() -> None:
    sens = sensitive_create(KEY_AUTH, KEY_DATA)
    cmd = create_primary(OWNER_PW, sens)
    out = redact_command(cmd)
    # The whole inSensitive is zeroed but for its size; the owner's password, not its size.
    assert out == create_primary(bytes(len(OWNER_PW)), sens[:2] + bytes(len(sens) - 2))
    assert out[:14] == cmd[:14]  # header and the handle area
    assert KEY_AUTH not in out and KEY_DATA not in out and OWNER_PW not in out
    assert ECC_TEMPLATE in out


def test_real_commands_and_responses(real: Exchange) -> None:
    cmd, rsp = real.create_primary
    sens = sensitive_create(KEY_AUTH)
    assert redact_command(cmd) == cmd.replace(sens, sens[:2] + bytes(len(sens) - 2))
    assert redact_response(CC_CREATE_PRIMARY, rsp) == rsp  # public area, creation data, name: kept

    cmd, rsp = real.nv_define
    assert diff(cmd, redact_command(cmd)) == span(cmd, NV_AUTH)

    cmd, rsp = real.nv_write
    assert diff(cmd, redact_command(cmd)) == span(cmd, NV_AUTH) | span(cmd, NV_DATA)
    assert redact_response(CC_NV_WRITE, rsp) == rsp

    cmd, rsp = real.nv_read
    assert diff(cmd, redact_command(cmd)) == span(cmd, NV_AUTH)
    out = redact_response(CC_NV_READ, rsp)
    assert diff(rsp, out) == span(rsp, NV_DATA)
    assert out[:14] == rsp[:14]  # header, parameterSize

    cmd, rsp = real.get_random
    assert redact_command(cmd) == cmd
    out = redact_response(CC_GET_RANDOM, rsp)
    assert out == rsp[:12] + bytes(16) and rsp[10:12] == u16(16)


def test_response_session_hmac_is_zeroed() -> None:
    data = tpm2b(b"NVDATA!!")
    session = tpm2b(b"N" * 16) + b"\x01" + tpm2b(b"H" * 32)
    rsp = struct.pack(">HII", 0x8002, 14 + len(data) + len(session), 0) + u32(len(data)) + data + session
    out = redact_response(CC_NV_READ, rsp)
    assert diff(rsp, out) == span(rsp, b"NVDATA!!") | span(rsp, b"H" * 32)  # the nonce stays


def test_decrypt_session_ciphertext_is_zeroed_when_listed() -> None:
    cmd = nv_write(NV_AUTH, b"\x8f\x13ciphertext", attrs=0x21)  # continueSession | decrypt
    assert diff(cmd, redact_command(cmd)) == span(cmd, NV_AUTH) | span(cmd, b"\x8f\x13ciphertext")


def test_error_responses_keep_their_header() -> None:
    rsp = struct.pack(">HII", 0x8001, 10, 0x98E)
    assert redact_response(CC_NV_READ, rsp) == rsp
    assert redact_response(0x20000001, rsp) == rsp


def test_every_listed_secret_is_a_tpm2b_of_the_parsers_tables() -> None:
    """Zeroing a TPM2B's contents and keeping its size is what keeps the length and the layout."""
    for table, registry in ((audit.COMMAND_SECRETS, tpm2_command._commands_),
                            (audit.RESPONSE_SECRETS, tpm2_response._commands_)):  # fmt: skip
        for cc, indices in table.items():
            types = registry[cc].parameter_types()
            for i in indices:
                names = [t.__name__ for t in getattr(types[i], "__args__", (types[i],))
                         if getattr(t, "__origin__", None) is not TPM_ENCRYPTED_PARAMETER]  # fmt: skip
                assert names and all(n.startswith("TPM2B_") for n in names), (command_name(cc), i, names)


# --- redaction: malformed input ---------------------------------------------------------------


def test_truncated_commands_and_responses_are_redacted_wholesale(real: Exchange) -> None:
    for cmd, rsp in real.pairs():
        cc = struct.unpack_from(">I", cmd, 6)[0]
        for n in range(len(cmd)):
            assert redact_command(cmd[:n]) == wholesale(cmd[:n])
        for n in range(len(rsp)):
            assert redact_response(cc, rsp[:n]) == wholesale(rsp[:n])
        # Trailing bytes, a header that claims the extra bytes, an area overrunning the command.
        for bad in (cmd + b"\x00", struct.pack(">HI", 0x8002, len(cmd) + 1) + cmd[6:] + b"\x00"):
            assert redact_command(bad) == wholesale(bad)
    cmd = nv_read(NV_AUTH)
    overrun = cmd[:18] + u32(0xFFFF) + cmd[22:]
    assert redact_command(overrun) == wholesale(overrun)


def test_no_single_byte_change_leaks_or_raises(real: Exchange) -> None:
    """Whatever one byte of a real command or response is changed to, nothing raises, the length
    and header stay, and the secret never comes through (it would only in a layout that makes the
    same bytes something else for the TPM too)."""
    secrets = (KEY_AUTH, NV_AUTH, NV_DATA)
    for cmd, rsp in real.pairs():
        cc = struct.unpack_from(">I", cmd, 6)[0]
        for data, redact in ((cmd, redact_command), (rsp, lambda d, cc=cc: redact_response(cc, d))):
            for i in range(len(data)):
                for value in (0x00, 0x01, 0x7F, 0xFF):
                    bad = data[:i] + bytes([value]) + data[i + 1 :]
                    out = redact(bad)
                    assert len(out) == len(bad) and out[:10] == bad[:10]
                    assert not any(s in out for s in secrets), (data.hex(), i, value)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_garbage_never_raises(data: bytes, cc: int) -> None:
    for out in (redact_command(data), redact_response(cc, data), redact_response(CC_NV_READ, data)):
        assert len(out) == len(data) and out[:10] == data[:10]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([CC_CREATE_PRIMARY, CC_NV_READ, CC_NV_WRITE, CC_NV_DEFINE, 0x153]))
def test_garbage_behind_a_plausible_header_never_raises(body: bytes, cc: int) -> None:
    for tag in (0x8001, 0x8002):
        data = struct.pack(">HII", tag, 10 + len(body), cc) + body
        out = redact_command(data)
        assert len(out) == len(data) and out[:10] == data[:10]
        out = redact_response(cc, struct.pack(">HII", tag, 10 + len(body), 0) + body)
        assert len(out) == len(data)


# --- the JSON lines file ----------------------------------------------------------------------


def test_audit_log_appends_and_reopens_after_rotation(tmp_path: Path, real: Exchange) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": true}\n')
    path.chmod(0o640)
    log = AuditLog(str(path))
    assert path.stat().st_mode & 0o777 == 0o640  # an existing file is appended to, as it is
    cmd, rsp = real.nv_read
    log.write(entry(cmd, rsp, pid=1))
    # Line-buffered: the line is in the file before any close.
    assert [json.loads(x).get("pid") for x in path.read_text().splitlines()] == [None, 1]

    rotated = tmp_path / "audit.jsonl.1"
    path.rename(rotated)  # logrotate's move, then SIGHUP
    log.write(entry(cmd, rsp, pid=2))  # still the old file until reopen
    log.reopen()
    log.write(entry(cmd, rsp, pid=3))
    log.close()
    log.close()  # idempotent
    assert [json.loads(x).get("pid") for x in rotated.read_text().splitlines()] == [None, 1, 2]
    assert [json.loads(x)["pid"] for x in path.read_text().splitlines()] == [3]
    assert path.stat().st_mode & 0o777 == 0o600  # created by the log: owner-only
    with pytest.raises(ValueError):
        log.write(entry(cmd, rsp))


def test_audit_log_to_stdout(capsys: pytest.CaptureFixture[str], real: Exchange) -> None:
    cmd, rsp = real.get_random
    log = AuditLog("-")
    log.write(entry(cmd, rsp, comm="tpm2_getrandom"))
    log.reopen()  # nothing to reopen: still stdout
    log.write(entry(cmd, b"", errno="EBUSY"))
    log.close()
    print("stdout still open")
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["cc"] for x in lines[:2]] == ["GetRandom", "GetRandom"]
    assert json.loads(lines[0])["comm"] == "tpm2_getrandom" and json.loads(lines[1])["errno"] == "EBUSY"
    assert lines[2] == "stdout still open"


# --- the capture, read back by tshark ---------------------------------------------------------


def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.fail("tshark is not on PATH: install the Debian package tshark (scripts/install-deps.sh lists it)")
    return path


def test_a_missing_tshark_fails_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="Debian package tshark"):
        tshark()


def tshark_fields(capture: Path, display_filter: str, *fields: str, prefs: tuple[str, ...] = ()) -> list[list[str]]:
    args = [tshark(), "-n", "-r", str(capture), "-Y", display_filter, "-T", "fields"]
    for pref in prefs:
        args += ["-o", pref]
    for f in fields:
        args += ["-e", f]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def session_of(exchange: Exchange) -> list[tuple[Entry, int]]:
    """Two open files' worth of entries (with their command codes), as a node would log them."""
    r = exchange
    refused_rsp = struct.pack(">HII", 0x8001, 10, 0x000B0149)
    undefine = command(CC_NV_UNDEFINE, u32(RH_OWNER) + u32(0x01500999) + pw_session(b""), tag=0x8002)
    refused = entry(undefine, refused_rsp, time=T0 + 5, stream=1, decision="refused:nv", backend_commands=0)
    items = [
        (entry(*r.create_primary, time=T0, stream=0, comm="tpm2_createprimary"), CC_CREATE_PRIMARY),
        (entry(*r.nv_define, time=T0 + 1, stream=0), CC_NV_DEFINE),
        (entry(*r.nv_write, time=T0 + 2, stream=1, comm="tpm2_nvwrite"), CC_NV_WRITE),
        (entry(*r.nv_read, time=T0 + 3, stream=1), CC_NV_READ),
        (entry(*r.get_random, time=T0 + 4, stream=0), CC_GET_RANDOM),
        (refused, CC_NV_UNDEFINE),
        (entry(r.get_random[0], b"", time=T0 + 6, stream=0, errno="EINVAL", backend_commands=0), CC_GET_RANDOM),
        (entry(*r.flush, time=T0 + 7, stream=0), CC_FLUSH),
    ]
    return items


def write_capture(path: Path, items: list[tuple[Entry, int]], redact: bool = True) -> None:
    w = PcapngWriter(str(path), redact=redact)
    for e, _ in items:
        w.write(e)
    w.end_stream(1, T0 + 8)
    w.close()
    w.close()


def test_tshark_decodes_the_commands_and_responses_in_order(tmp_path: Path, real: Exchange) -> None:
    items = session_of(real)
    capture = tmp_path / "node.pcapng"
    write_capture(capture, items)

    # The command codes, one line per TPM packet (responses give an empty line), in order.
    ccs = [row[0] for row in tshark_fields(capture, "tpm", "tpm.req.cc") if row[0]]
    assert ccs == [f"0x{cc:08x}" for _, cc in items]

    # Every response's rc (tpm.resp.rc), in order; the failed write has none.
    rows = tshark_fields(capture, "tpm", "tpm.req.cc", "tpm.resp.rc", "tcp.stream", "frame.time_epoch")
    rcs = [row[1] for row in rows if row[1]]
    assert rcs == [f"0x{rc_of(e.response):08x}" for e, _ in items if e.response]
    assert "0x000b0149" in rcs
    # One TCP stream per open file.
    assert [int(row[2]) for row in rows if row[0]] == [e.stream for e, _ in items]
    # Microsecond timestamps: a command at entry.time, its response duration later.
    stamps = [row[3] for row in rows]
    assert stamps[0].startswith("1700000000.250000") and stamps[1].startswith("1700000000.251234")


def test_tcp_framing_is_clean(tmp_path: Path, real: Exchange) -> None:
    items = session_of(real)
    big = command(0x20000001, bytes(70_000))  # more than one IPv4 packet holds: cut to one
    items.append((entry(big, b"", time=T0 + 9, stream=2, errno="EINVAL"), 0x20000001))
    capture = tmp_path / "node.pcapng"
    write_capture(capture, items)
    prefs = ("tcp.check_checksum:TRUE", "ip.check_checksum:TRUE")
    bad = "tcp.analysis.flags || tcp.checksum.status != 1 || ip.checksum.status != 1"
    assert tshark_fields(capture, bad, "frame.number", prefs=prefs) == []
    # A handshake opens each stream; end_stream closes stream 1 with FINs from both sides.
    assert len(tshark_fields(capture, "tcp.flags.syn == 1 && tcp.flags.ack == 0", "tcp.stream")) == 3
    assert [r[0] for r in tshark_fields(capture, "tcp.flags.fin == 1", "tcp.stream")] == ["1", "1"]
    # The command frames carry who sent them and what the rules said.
    comments = [r[0] for r in tshark_fields(capture, "tpm.req.cc", "frame.comment")]
    assert comments[0] == "tpmrm-alice uid=1000 gid=100 pid=4242 comm=tpm2_createprimary allowed"
    assert comments[5].endswith(" refused:nv") and comments[6].endswith(" allowed errno=EINVAL")
    assert comments[8].endswith(" errno=EINVAL truncated=70010")
    assert tshark_fields(capture, "tcp.stream == 2 && tpm", "tcp.len") == [["65495"]]


def test_the_capture_is_redacted_unless_asked_not_to(tmp_path: Path, real: Exchange) -> None:
    items = session_of(real)
    redacted, raw = tmp_path / "redacted.pcapng", tmp_path / "raw.pcapng"
    write_capture(redacted, items)
    write_capture(raw, items, redact=False)
    for secret in (KEY_AUTH, NV_AUTH, NV_DATA):
        assert secret not in redacted.read_bytes() and secret in raw.read_bytes()
    # NV_Write's password session, as the dissector shows it (tpm.session_auth).
    auth = [r[0] for r in tshark_fields(redacted, "tpm.req.cc == 0x137", "tpm.session_auth")]
    assert auth == ["00" * len(NV_AUTH)]
    auth = [r[0] for r in tshark_fields(raw, "tpm.req.cc == 0x137", "tpm.session_auth")]
    assert auth == [NV_AUTH.hex()]
    # Same packets either way: redaction keeps every length.
    assert redacted.stat().st_size == raw.stat().st_size


def test_capture_layout_one_section_one_interface(tmp_path: Path, real: Exchange) -> None:
    capture = tmp_path / "node.pcapng"
    write_capture(capture, session_of(real))
    data = capture.read_bytes()
    kinds, off = [], 0
    while off < len(data):
        kind, length = struct.unpack_from("<II", data, off)
        assert length % 4 == 0 and struct.unpack_from("<I", data, off + length - 4)[0] == length
        kinds.append(kind)
        off += length
    assert kinds[:2] == [0x0A0D0D0A, 0x00000001] and set(kinds[2:]) == {0x00000006}
    assert capture.stat().st_mode & 0o777 == 0o600


def test_capture_to_stdout(capfdbinary: pytest.CaptureFixture[bytes], real: Exchange) -> None:
    w = PcapngWriter("-")
    w.write(entry(*real.get_random))
    w.close()
    out = capfdbinary.readouterr().out
    assert out[:4] == b"\x0a\x0d\x0d\x0a" and real.get_random[0] in out
    assert real.get_random[1][12:] not in out  # the random bytes, redacted
