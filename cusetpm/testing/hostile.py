# SPDX-License-Identifier: GPL-2.0-only
"""Hostile input for the fuzz tests and ``make fuzz``: mutated TPM commands and FUSE/CUSE
requests, the answers the kernel may give them, and a bytes-only rig around the core.

Every mutator takes a :class:`random.Random`, so one code path serves hypothesis (which hands
out a recorded ``st.randoms()``) and the long seeded loop of ``scripts/fuzz.py``.

* :func:`valid_command` builds a well-formed command from a small vocabulary (GetRandom,
  GetCapability, CreatePrimary, StartAuthSession, ReadPublic, ContextSave/Load,
  FlushContext, PolicyRestart, Sign, an unknown code), naming handles from :class:`Pools`;
  :func:`mutate` applies one to three of bit flips, truncations, extensions, wrong header
  sizes, tag and code swaps, handle swaps and session areas with bogus sizes.
* :func:`harmless_to_others` is the one filter between a mutant and a shared TPM: the kernel
  does not virtualize session handles, so FlushContext of another file's session handle (or of
  any session handle with its index) destroys it on Linux too, and a few commands change the TPM for every user (Clear,
  HierarchyControl, ...).  Those are not the resource manager's to refuse; they are left out.
* :class:`CoreRig` runs the port (``FileState`` + ``tpm_dev_transmit``) on a
  :class:`~cusetpm.testing.fake_tpm.FakeTpm` with a bystander file holding an object and a
  session, and checks every answer and, at the end, the bystander and the TPM's handles.
"""

from __future__ import annotations

import errno
import random
import struct
from dataclasses import dataclass, field

from ..kernel import wire
from ..kernel.profiles import PROFILES
from ..kernel.request import Io, T, run_sync
from ..kernel.structs import Chip
from ..kernel.tpm2_cmd import auto_startup
from ..kernel.tpm_dev_common import FileState, release_space, tpm_dev_transmit
from ..kernel.wire import be32, command, u32
from .fake_tpm import FakeTpm

#: What write() and read() of a tpmrm file may fail with on a healthy TPM: tpm_common_write()
#: (E2BIG, EBUSY, EINVAL), tpm_try_transmit() (ENODATA, E2BIG, EFAULT), tpm2-space.c
#: (EINVAL, EFAULT, ENOMEM, ENOENT).  EOPNOTSUPP never leaves: it becomes a response.
KERNEL_ERRNOS = frozenset(
    {errno.E2BIG, errno.EBUSY, errno.EINVAL, errno.ENODATA, errno.EFAULT, errno.ENOMEM, errno.ENOENT}
)

RH_OWNER = 0x40000001
RH_NULL = 0x40000007
RS_PW = 0x40000009
TAG_SESSIONS = 0x8002
CC_CREATE_PRIMARY = 0x131
CC_START_AUTH_SESSION = 0x176
CC_READ_PUBLIC = 0x173
CC_POLICY_RESTART = 0x180
CC_POLICY_GET_DIGEST = 0x189
CC_SIGN = 0x15D
CC_HASH_SEQUENCE_START = 0x186
RC_INSUFFICIENT = 0x9A

#: Commands that change the TPM for all of its users, which an RM passes on as the kernel does:
#: Clear, ClearControl, HierarchyControl, HierarchyChangeAuth, ChangePPS, ChangeEPS, Shutdown,
#: EvictControl, SetPrimaryPolicy, DictionaryAttackParameters, ClockSet, FieldUpgradeStart,
#: PCR_Allocate, NV_DefineSpace, NV_UndefineSpace(Special), Startup.
TPM_WIDE = frozenset(
    {0x126, 0x127, 0x121, 0x129, 0x125, 0x124, 0x145, 0x120, 0x12E, 0x13A, 0x128, 0x12F, 0x12B, 0x12A, 0x122,
     0x11F, 0x144}
)  # fmt: skip

_SIGNING_PUBLIC = bytes.fromhex(
    # TPM2B_PUBLIC: ECC, SHA256, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|sign,
    # no policy, ECDSA-SHA256 on NIST P-256, KDF null, empty unique point.
    "0018" "0023" "000b" "00040472" "0000" "0010" "0018" "000b" "0003" "0010" "0000" "0000"
)  # fmt: skip


def pw_auth(password: bytes = b"") -> bytes:
    """An authorization area of one password session (continueSession set)."""
    area = u32(RS_PW) + b"\x00\x00" + b"\x01" + struct.pack(">H", len(password)) + password
    return u32(len(area)) + area


def create_primary(hierarchy: int = RH_OWNER) -> bytes:
    """CreatePrimary of a small ECC signing key (noDA: fuzzing cannot lock it out)."""
    body = u32(hierarchy) + pw_auth() + b"\x00\x04\x00\x00\x00\x00" + _SIGNING_PUBLIC + b"\x00\x00" + u32(0)
    return command(CC_CREATE_PRIMARY, body, tag=TAG_SESSIONS)


def start_auth_session(policy: bool = False, nonce: bytes = bytes(16)) -> bytes:
    body = u32(RH_NULL) + u32(RH_NULL) + struct.pack(">H", len(nonce)) + nonce + b"\x00\x00"
    body += bytes([1 if policy else 0]) + b"\x00\x10" + b"\x00\x0b"
    return command(CC_START_AUTH_SESSION, body)


def sign(key: int, digest: bytes = bytes(32)) -> bytes:
    """Sign(key, digest) with ECDSA-SHA256 and the NULL ticket of an unrestricted key."""
    body = u32(key) + pw_auth() + struct.pack(">H", len(digest)) + digest
    body += b"\x00\x18\x00\x0b" + b"\x80\x24" + u32(RH_NULL) + b"\x00\x00"
    return command(CC_SIGN, body, tag=TAG_SESSIONS)


def get_cap_handles(first: int = wire.HT_TRANSIENT, count: int = 64) -> bytes:
    return command(wire.CC_GET_CAPABILITY, u32(wire.CAP_HANDLES) + u32(first) + u32(count))


def handles_of(rsp: bytes) -> list[int]:
    """The handles a GetCapability(HANDLES) response lists."""
    return [be32(rsp, 19 + 4 * i) for i in range(be32(rsp, 15))]


@dataclass
class Pools:
    """What a mutant may name: handles to swap in, context blobs to load."""

    handles: list[int] = field(
        default_factory=lambda: [0x80FFFFFF, 0x80FFFFFE, 0x80FFFFFD, 0x80FFFFFC, 0x80000000, 0x80000001,
                                 0x02000000, 0x03000000, 0x40000001, 0x40000007, 0x40000009, 0x81000001,
                                 0x01000000, 0, 0xFFFFFFFF]
    )  # fmt: skip
    blobs: list[bytes] = field(default_factory=list)

    def handle(self, rng: random.Random) -> int:
        if rng.random() < 0.15:
            return rng.getrandbits(32)
        return rng.choice(self.handles)

    def learn(self, cmd: bytes, rsp: bytes) -> None:
        """Remember what a response gave: a context blob, a session or object handle."""
        if len(rsp) < 14 or len(cmd) < 10 or be32(rsp, 6) != 0:
            return
        cc = be32(cmd, 6)
        if cc == wire.CC_CONTEXT_SAVE and len(self.blobs) < 16:
            self.blobs.append(rsp[wire.TPM_HEADER_SIZE :])
        elif cc in (CC_CREATE_PRIMARY, CC_START_AUTH_SESSION, wire.CC_CONTEXT_LOAD):
            h = be32(rsp, wire.TPM_HEADER_SIZE)
            if h not in self.handles and len(self.handles) < 64:
                self.handles.append(h)


def valid_command(rng: random.Random, pools: Pools) -> bytes:
    """One well-formed command of the vocabulary, naming handles from ``pools``."""
    h = pools.handle(rng)
    kind = rng.randrange(13)
    if kind == 0:
        return command(wire.CC_GET_RANDOM, struct.pack(">H", rng.choice((0, 1, 8, 32, 48, 0xFFFF))))
    if kind == 1:
        first = rng.choice((wire.HT_TRANSIENT, 0x02000000, 0x03000000, 0x81000000, 0x40000000))
        return get_cap_handles(first, rng.choice((0, 1, 3, 64, 0xFFFFFFFF)))
    if kind == 2:
        cap = rng.choice((wire.CAP_TPM_PROPERTIES, wire.CAP_COMMANDS, 0, 9, 0x100))
        return command(wire.CC_GET_CAPABILITY, u32(cap) + u32(rng.getrandbits(32)) + u32(rng.randrange(300)))
    if kind == 3:
        return create_primary(rng.choice((RH_OWNER, RH_NULL, h)))
    if kind == 4:
        return start_auth_session(policy=rng.random() < 0.5)
    if kind == 5:
        return command(CC_READ_PUBLIC, u32(h))
    if kind == 6:
        return command(wire.CC_CONTEXT_SAVE, u32(h))
    if kind == 7:
        blob = rng.choice(pools.blobs) if pools.blobs and rng.random() < 0.8 else _fake_blob(rng, h)
        return command(wire.CC_CONTEXT_LOAD, blob)
    if kind == 8:
        return command(wire.CC_FLUSH_CONTEXT, u32(h))
    if kind == 9:
        return command(rng.choice((CC_POLICY_RESTART, CC_POLICY_GET_DIGEST)), u32(h))
    if kind == 10:
        return sign(h)
    if kind == 11:
        return command(CC_HASH_SEQUENCE_START, b"\x00\x00\x00\x0b")
    return command(rng.choice((0xFFFF, 0x20000000, 0x20000001, 0x100, 0x19F, rng.getrandbits(32))))


def _fake_blob(rng: random.Random, h: int) -> bytes:
    """A TPMS_CONTEXT shaped like the real ones, with a made-up blob."""
    data = rng.randbytes(rng.choice((0, 4, 32, 200)))
    return struct.pack(">QIIH", rng.getrandbits(64), h, RH_NULL, len(data)) + data


# --- mutations -------------------------------------------------------------------------------


def _bit_flips(rng: random.Random, b: bytearray, pools: Pools) -> None:
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        if b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)


def _truncate(rng: random.Random, b: bytearray, pools: Pools) -> None:
    """Cut the command short; half the time the size field follows (a consistent short command)."""
    n = rng.randrange(len(b) + 1)
    del b[n:]
    if len(b) >= 6 and rng.random() < 0.5:
        struct.pack_into(">I", b, 2, len(b))


def _extend(rng: random.Random, b: bytearray, pools: Pools) -> None:
    b += rng.randbytes(rng.choice((1, 4, 100, 4096 - len(b) % 4096, 4097)))
    if len(b) >= 6 and rng.random() < 0.5:
        struct.pack_into(">I", b, 2, len(b) & 0xFFFFFFFF)


def _header_size(rng: random.Random, b: bytearray, pools: Pools) -> None:
    if len(b) < 6:
        return
    size = be32(b, 2)
    struct.pack_into(
        ">I", b, 2, rng.choice((0, 1, 6, 9, 10, size - 1, size + 1, len(b) - 1, 4096, 4097, 0xFFFFFFFF)) & 0xFFFFFFFF
    )


def _tag(rng: random.Random, b: bytearray, pools: Pools) -> None:
    if len(b) >= 2:
        struct.pack_into(">H", b, 0, rng.choice((0x8001, 0x8002, 0x00C1, 0x0000, rng.getrandbits(16))))


def _code(rng: random.Random, b: bytearray, pools: Pools) -> None:
    if len(b) >= 10:
        cc = rng.choice((0x161, 0x162, 0x165, 0x131, 0x176, 0x173, 0x17A, 0x17B, 0x15D, 0x180, 0x20000000))
        struct.pack_into(">I", b, 6, rng.getrandbits(32) if rng.random() < 0.2 else cc)


def _handle_swap(rng: random.Random, b: bytearray, pools: Pools) -> None:
    """Put another handle where a handle is (or may be): offsets 10, 14, 18."""
    k = rng.choice((0, 0, 1, 2))
    off = 10 + 4 * k
    if len(b) >= off + 4:
        struct.pack_into(">I", b, off, pools.handle(rng))


def _session_area(rng: random.Random, b: bytearray, pools: Pools) -> None:
    """A session area with bogus sizes: authorizationSize, or the nonce/hmac sizes inside it."""
    if len(b) < 14:
        return
    struct.pack_into(">H", b, 0, TAG_SESSIONS)
    # The area follows 0, 1 or 2 handles; guess which.
    off = 10 + 4 * rng.choice((0, 1, 1, 2))
    if len(b) < off + 4:
        return
    which = rng.randrange(3)
    bogus = rng.choice((0, 1, 8, 9, 0xFFFF, 0x10000, 0xFFFFFFFF, len(b), len(b) - off - 4, rng.getrandbits(32)))
    if which == 0:
        struct.pack_into(">I", b, off, bogus & 0xFFFFFFFF)
    elif which == 1 and len(b) >= off + 10:
        struct.pack_into(">H", b, off + 8, bogus & 0xFFFF)  # nonceCaller.size
    elif len(b) >= off + 13:
        struct.pack_into(">H", b, off + 11, bogus & 0xFFFF)  # hmac.size of an empty nonce


def _splice(rng: random.Random, b: bytearray, pools: Pools) -> None:
    other = valid_command(rng, pools)
    i = rng.randrange(len(b) + 1)
    b[i:] = other[rng.randrange(len(other) + 1) :]


def _insert_delete(rng: random.Random, b: bytearray, pools: Pools) -> None:
    i = rng.randrange(len(b) + 1)
    if rng.random() < 0.5:
        b[i:i] = rng.randbytes(rng.choice((1, 2, 4)))
    else:
        del b[i : i + rng.choice((1, 2, 4))]


MUTATIONS = (
    _bit_flips, _truncate, _extend, _header_size, _tag, _code, _handle_swap, _handle_swap, _session_area,
    _session_area, _splice, _insert_delete,
)  # fmt: skip


def mutate(rng: random.Random, cmd: bytes, pools: Pools) -> bytes:
    """One to three mutations of ``cmd``."""
    b = bytearray(cmd)
    for _ in range(rng.choice((1, 1, 2, 3))):
        rng.choice(MUTATIONS)(rng, b, pools)
    return bytes(b)


def mutant(rng: random.Random, pools: Pools) -> bytes:
    """A command for a hostile file: mostly a mutated valid one, sometimes valid, sometimes noise."""
    r = rng.random()
    if r < 0.1:
        return valid_command(rng, pools)
    if r < 0.15:
        return rng.randbytes(rng.choice((0, 1, 5, 6, 9, 10, 11, 64, 4096, 4097)))
    return mutate(rng, valid_command(rng, pools), pools)


def harmless_to_others(cmd: bytes, others_sessions: set[int]) -> bool:
    """False for what would hurt other files on Linux too (see the module docstring)."""
    if len(cmd) < 10:
        return True
    cc = be32(cmd, 6)
    if cc in TPM_WIDE:
        return False
    if len(cmd) >= 14 and _is_session(h := be32(cmd, 10)):
        # FlushContext(h), or any code the kernel treats as one-handle with h first: the
        # kernel translates only transient handles, so h reaches the TPM as written.  The TPM
        # names a session by its index: 0x02000000 flushes policy session 0x03000000 too.
        return all(h & wire.HR_HANDLE_MASK != s & wire.HR_HANDLE_MASK for s in others_sessions)
    return True


def _is_session(h: int) -> bool:
    return h & wire.HR_RANGE_MASK in (wire.HT_HMAC_SESSION, wire.HT_POLICY_SESSION)


def response_problem(rsp: bytes) -> str | None:
    """Why ``rsp`` is no well-formed TPM response, or None: at least a header, at most the
    buffer, and a size field that says its own length."""
    if len(rsp) < wire.TPM_HEADER_SIZE:
        return f"response of {len(rsp)} bytes is shorter than a header: {rsp.hex()}"
    if len(rsp) > wire.TPM_BUFSIZE:
        return f"response of {len(rsp)} bytes is longer than the buffer"
    if be32(rsp, 2) != len(rsp):
        return f"response says {be32(rsp, 2)} bytes, is {len(rsp)}: {rsp[:16].hex()}"
    return None


def foreign_handles(cmd: bytes, rsp: bytes, own: set[int]) -> list[int]:
    """Transient handles a successful GetCapability(HANDLES) lists that are not ``own``: the
    kernel shows a file its own virtual handles only (tpm2_map_response_body)."""
    if len(cmd) < 10 or be32(cmd, 6) != wire.CC_GET_CAPABILITY or len(rsp) < 19 or be32(rsp, 6) != 0:
        return []
    if be32(rsp, 11) != wire.CAP_HANDLES:
        return []
    listed = handles_of(rsp)
    return [h for h in listed if h & wire.HR_RANGE_MASK == wire.HT_TRANSIENT and h not in own]


def self_saved_session(cmd: bytes, rsp: bytes) -> int | None:
    """The session a successful ContextSave from user space took out of its file's space.

    tpm2_save_space() then gets REFERENCE_H0 for it and forgets it: the session stays saved
    in the TPM after the file is closed, on Linux as here (tpm2-space.c, ``-ENOENT``: "just
    forget it").  The fuzzers account for these instead of calling them leaks.
    """
    if len(cmd) < 10 or be32(cmd, 6) != wire.CC_CONTEXT_SAVE or len(rsp) < 22 or be32(rsp, 6) != 0:
        return None
    h = be32(rsp, 18)  # TPMS_CONTEXT.savedHandle, after the 8-byte sequence
    return h if _is_session(h) else None


# --- the core on a fake TPM ------------------------------------------------------------------


class Finding(AssertionError):
    """A hostile input got an answer the kernel could not give, or broke something."""


@dataclass
class CoreFile:
    """One open file of the port, driven in one thread as tpm_common_write()/read() do."""

    state: FileState
    #: Sessions this file took out of its own space with ContextSave (see self_saved_session).
    self_saved: set[int] = field(default_factory=set)


class CoreRig:
    """The port on a FakeTpm, a bystander file with an object and a policy session, and the
    checks every hostile write and read must pass.  Raises :class:`Finding`; anything else it
    raises is the port (or the fake) failing."""

    #: TPM_RC_INTEGRITY + parameter 1: what a TPM says of a context blob it did not issue.
    RC_BAD_BLOB = 0x1DF

    def __init__(self, profile: str = "6.12") -> None:
        self.tpm = FakeTpm()
        self.chip = Chip(PROFILES[profile])
        self._issued: set[bytes] = set()
        #: Inputs the fake TPM itself could not parse (answered TPM_RC_INSUFFICIENT).
        self.fake_errors: list[str] = []
        self.inputs = 0
        self.skipped = 0
        self.files: list[CoreFile] = []
        self.run(auto_startup(self.chip))
        self.pools = Pools()
        self.bystander = self.open()
        rsp = self.cmd(self.bystander, create_primary())
        self.key = be32(rsp, 10)
        rsp = self.cmd(self.bystander, start_auth_session(policy=True))
        self.session = be32(rsp, 10)
        self.pools.handles += [self.key, self.session]

    # The fake keeps a context blob as a bare index into its table; a real TPM protects it
    # with an HMAC.  The rig answers a blob the fake never issued as a real TPM would, so a
    # bit flip cannot forge the bystander's contexts.
    def _transport(self, data: bytes) -> bytes:
        if len(data) >= 10 and be32(data, 6) == wire.CC_CONTEXT_LOAD and data[10:] not in self._issued:
            return command(self.RC_BAD_BLOB)
        try:
            rsp = self.tpm.execute(data)
        except (struct.error, IndexError) as exc:
            # The fake's own parsing gave up: a TPM says INSUFFICIENT.  Counted, not fatal:
            # the fake is test support, the port is what is fuzzed.
            self.fake_errors.append(f"{data[:64].hex()}: {exc!r}")
            rsp = command(RC_INSUFFICIENT)
        if len(data) >= 10 and be32(data, 6) == wire.CC_CONTEXT_SAVE and be32(rsp, 6) == 0:
            self._issued.add(rsp[10:])
        return rsp

    def run(self, gen: Io[T]) -> T:
        return run_sync(gen, lambda req: self._transport(req.data))

    def open(self) -> CoreFile:
        f = CoreFile(FileState(self.chip.profile))
        self.files.append(f)
        return f

    def close(self, f: CoreFile) -> None:
        self.files.remove(f)
        self.run(release_space(self.chip, f.state.space))

    def cmd(self, f: CoreFile, data: bytes) -> bytes:
        """A command that must succeed (the rig's own)."""
        assert self.write(f, data) == len(data)
        rsp = self.read(f, wire.TPM_BUFSIZE)
        if be32(rsp, 6) != 0:
            raise Finding(f"{data.hex()} failed with rc {be32(rsp, 6):#x}")
        return rsp

    # --- what a hostile file does --------------------------------------------------------

    def write(self, f: CoreFile, data: bytes, nonblock: bool = False) -> int | OSError | None:
        """tpm_common_write(); an allowed errno is returned, not raised.  None: not sent, as
        it would hurt the bystander on Linux too (:func:`harmless_to_others`)."""
        if f is not self.bystander and not harmless_to_others(data, {self.session}):
            self.skipped += 1
            return None
        if f is not self.bystander:
            self.inputs += 1
        st = f.state
        try:
            FileState.check_size(len(data))
            st.accept_write(data, nonblock)
            result = self.run(tpm_dev_transmit(self.chip, st.space, st.buf))
            if nonblock:
                st.async_finished(result, 0.0)  # the async work, run at once
                ret: int | OSError = len(data)
            else:
                ret = st.command_finished(result, len(data), 0.0)
        except OSError as exc:
            if exc.errno not in KERNEL_ERRNOS:
                raise Finding(f"write of {data.hex()}: errno {exc.errno} is none the kernel gives") from exc
            ret = exc
        if isinstance(ret, int):
            if ret != len(data):
                raise Finding(f"write of {data.hex()} returned {ret}")
            if st.response_length > 0:
                problem = response_problem(bytes(st.buf[: st.response_length]))
                if problem:
                    raise Finding(f"write of {data.hex()}: {problem}")
                own = {0x80FFFFFF - i for i, h in enumerate(st.space.context_tbl) if h}
                if foreign := foreign_handles(data, bytes(st.buf[: st.response_length]), own):
                    raise Finding(f"write of {data.hex()}: lists handles not its own: {foreign}")
                saved = self_saved_session(data, bytes(st.buf[: st.response_length]))
                if saved is not None:
                    f.self_saved.add(saved)
                self.pools.learn(data, bytes(st.buf[: st.response_length]))
        self.check_tpm(f, data)
        return ret

    def read(self, f: CoreFile, size: int) -> bytes:
        st = f.state
        before = st.response_length
        if not st.read_needs_lock(size):
            return b""
        try:
            out = st.read(size)
        except OSError as exc:
            if exc.errno not in KERNEL_ERRNOS or before >= 0:
                raise Finding(f"read({size}): errno {exc.errno} with {before} bytes pending") from exc
            return b""
        if len(out) > size or len(out) > max(before, 0):
            raise Finding(f"read({size}) gave {len(out)} bytes with {before} pending")
        return out

    # --- what must hold ------------------------------------------------------------------

    def check_tpm(self, f: CoreFile, data: bytes) -> None:
        """Between commands the TPM holds no loaded object and no loaded session (the kernel
        saves or flushes all of them), and every saved session belongs to somebody."""
        if self.tpm.objects:
            raise Finding(f"after {data.hex()}: objects left loaded: {sorted(self.tpm.objects)}")
        if self.tpm.loaded_sessions():
            raise Finding(f"after {data.hex()}: sessions left loaded: {self.tpm.loaded_sessions()}")
        owned = set().union(*(set(g.state.space.session_tbl) | g.self_saved for g in self.files))
        stray = set(self.tpm.saved_sessions()) - owned
        if stray:
            raise Finding(f"after {data.hex()}: sessions nobody holds: {sorted(stray)}")

    def retire(self, f: CoreFile) -> None:
        """Close a hostile file and drop what it saved away (as its owner would have to)."""
        self.close(f)
        for h in f.self_saved:
            if h in self.tpm.sessions:
                self.tpm.execute(command(wire.CC_FLUSH_CONTEXT, u32(h)))
        left = set(self.tpm.sessions) - {self.session}
        if left or self.tpm.objects:
            raise Finding(f"after close: sessions {sorted(left)}, objects {sorted(self.tpm.objects)} left")

    def check_bystander(self) -> None:
        """The bystander's object and session are where they were, and usable."""
        b = self.bystander
        if self.write(b, get_cap_handles()) != len(get_cap_handles()):
            raise Finding("bystander: GetCapability failed")
        listed = handles_of(self.read(b, wire.TPM_BUFSIZE))
        if listed != [self.key]:
            raise Finding(f"bystander lists {[hex(h) for h in listed]}, had {self.key:#x}")
        self.cmd(b, command(CC_READ_PUBLIC, u32(self.key)))
        if self.session not in b.state.space.session_tbl or self.tpm.sessions.get(self.session) is not False:
            raise Finding(f"bystander lost its session {self.session:#x}")

    def finish(self) -> None:
        """Bystander intact; once it is closed too, nothing left in the TPM."""
        self.check_bystander()
        self.close(self.bystander)
        if self.tpm.sessions or self.tpm.objects:
            raise Finding(f"left in the TPM: sessions {sorted(self.tpm.sessions)}, objects {sorted(self.tpm.objects)}")
