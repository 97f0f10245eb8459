# SPDX-License-Identifier: GPL-2.0-only
"""What a tenant may ask of the shared TPM: the rules, and the one function that applies them.

Sans-I/O: :func:`decide` takes a command as the tenant wrote it and returns ``None`` (send it
on) or a :class:`Refusal` naming the rule and the response code the RM layer answers with.
The command is read by its layout: the handle area by tpm2-pytss's command tables
(``tpm2_command.num_handles``), and the two parameters a rule needs (NV_DefineSpace's
``publicInfo.nvIndex``, EvictControl's ``persistentHandle``) by tpm2-pytss's command parser.
A command a rule must read but that does not parse is refused (``unparsed``), so a malformed
command can never slip past a rule; a command no rule looks at goes on untouched, to get the
TPM's (or the kernel's) own answer.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from typing import Iterable

from tpm2_pytss.command_parser import read_command, tpm2_command
from tpm2_pytss.constants import TPM2_CC, TPM2_RH

from ..kernel import wire

RM = wire.RC_RESMGR_TPM_LAYER

#: The response code of each rule (the RM layer's, 0x000Bxxxx, with the TPM code that says
#: the same thing to a client that decodes it).
RC_DENY = RM | 0x143  # TPM_RC_COMMAND_CODE: this node does not offer the command
RC_HIERARCHY = RM | 0x085  # TPM_RC_HIERARCHY: that hierarchy is not this tenant's
RC_NV = RM | 0x149  # TPM_RC_NV_AUTHORIZATION: that NV index is not this tenant's
RC_PERSISTENT = RM | 0x08B  # TPM_RC_HANDLE: that persistent handle is not this tenant's
RC_PCR = RM | 0x907  # TPM_RC_LOCALITY: the TPM's own answer for a PCR one may not change
RC_OBJECTS = RM | 0x902  # TPM_RC_OBJECT_MEMORY: max_objects reached
RC_SESSIONS = RM | 0x903  # TPM_RC_SESSION_MEMORY: max_sessions reached
RC_SIZE = RM | 0x142  # TPM_RC_COMMAND_SIZE: longer than max_command_bytes
RC_UNPARSED = RM | 0x09A  # TPM_RC_INSUFFICIENT: a rule must read it, and it does not parse

#: The commands a tenant gets refused unless its ``deny`` says otherwise: they change the TPM
#: for every tenant (clear it, change or disable a hierarchy, its seeds, its DA lockout, its
#: clock, its firmware, its PCR banks, its global locks, its audit).
DEFAULT_DENY = (
    "Clear",
    "ClearControl",
    "HierarchyControl",
    "ChangePPS",
    "ChangeEPS",
    "DictionaryAttackLockReset",
    "DictionaryAttackParameters",
    "FieldUpgradeStart",
    "FieldUpgradeData",
    "FirmwareRead",
    "PP_Commands",
    "SetAlgorithmSet",
    "SetPrimaryPolicy",
    "PCR_Allocate",
    "PCR_SetAuthPolicy",
    "NV_GlobalWriteLock",
    "SetCommandCodeAuditStatus",
    "ClockSet",
    "ClockRateAdjust",
    "Shutdown",
)

HIERARCHIES = {
    "owner": int(TPM2_RH.OWNER),
    "endorsement": int(TPM2_RH.ENDORSEMENT),
    "platform": int(TPM2_RH.PLATFORM),
    "lockout": int(TPM2_RH.LOCKOUT),
}
#: TPM_RH_PLATFORM_NV authorizes NV writes with platform authority.
_PLATFORM_NV = 0x4000000D
#: What a tenant may authorize against by default: the lockout and platform hierarchies act
#: on the whole TPM.
DEFAULT_HIERARCHIES = ("owner", "endorsement")

#: The commands that only read an NV index (an ``nv_read`` range is enough for them).
NV_READ_ONLY = frozenset(
    int(c) for c in (TPM2_CC.NV_Read, TPM2_CC.NV_ReadPublic, TPM2_CC.NV_Certify, TPM2_CC.PolicyNV,
                     TPM2_CC.PolicyAuthorizeNV)
)  # fmt: skip
#: The commands that change a PCR (``pcrs``); reading stays open.
PCR_CHANGE = frozenset(
    int(c) for c in (TPM2_CC.PCR_Extend, TPM2_CC.PCR_Event, TPM2_CC.PCR_Reset, TPM2_CC.PCR_SetAuthValue)
)

HT_PCR, HT_NV_INDEX, HT_PERSISTENT = 0x00, 0x01, 0x81


@functools.cache
def command_names() -> dict[str, int]:
    """Every TPM2_CC member as tpm2-pytss spells it, lower-cased, to its code."""
    names: dict[str, int] = {}
    for name in dir(TPM2_CC):
        value = getattr(TPM2_CC, name)
        if isinstance(value, int) and not name.startswith("_") and name not in ("FIRST", "LAST"):
            names[name.lower()] = int(value)
    return names


def command_code(name: str) -> int:
    """A command name (any case) to its code; KeyError names the unknown one."""
    try:
        return command_names()[name.strip().lower()]
    except KeyError:
        raise KeyError(f"unknown TPM command name {name!r} (spell it as tpm2-pytss's TPM2_CC does)") from None


@dataclass(frozen=True, slots=True)
class Ranges:
    """Inclusive handle ranges; empty means none."""

    spans: tuple[tuple[int, int], ...] = ()

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, int) and any(lo <= handle <= hi for lo, hi in self.spans)

    @classmethod
    def parse(cls, items: Iterable[str | int], what: str) -> Ranges:
        """``["0x01500000-0x015000ff", "0x01500100", 0x81000010]``."""
        spans = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise ValueError(f"{what}: {item!r} is neither a handle nor a range")
            lo_s, dash, hi_s = str(item).partition("-") if isinstance(item, str) else (str(item), "", "")
            try:
                lo = int(lo_s.strip(), 0)
                hi = int(hi_s.strip(), 0) if dash else lo
            except ValueError:
                raise ValueError(f"{what}: {item!r} is not HANDLE or LOW-HIGH (hex or decimal)") from None
            if not 0 <= lo <= hi <= 0xFFFFFFFF:
                raise ValueError(f"{what}: {item!r} is not a range of 32-bit handles")
            spans.append((lo, hi))
        return cls(tuple(spans))

    def __str__(self) -> str:
        return ",".join(f"0x{lo:08x}" if lo == hi else f"0x{lo:08x}-0x{hi:08x}" for lo, hi in self.spans)


@dataclass(frozen=True, slots=True)
class Policy:
    """One tenant's rules; ``None`` for a dimension means it is not restricted."""

    deny: frozenset[int] = frozenset()
    #: Only these commands (None: any not denied).
    allow: frozenset[int] | None = None
    nv: Ranges | None = None
    nv_read: Ranges = Ranges()
    persistent: Ranges | None = None
    #: Persistent handles it may use but neither make nor evict (a shared SRK).
    persistent_use: Ranges = Ranges()
    pcrs: frozenset[int] | None = None
    hierarchies: frozenset[int] | None = None
    max_open: int = 0
    max_objects: int = 0
    max_sessions: int = 0
    commands_per_second: float = 0.0
    max_command_bytes: int = 0

    @property
    def restricts(self) -> bool:
        """False for the open policy of a node served without --config: nothing to check."""
        return self != OPEN


#: No rule at all: the kernel's behaviour, byte for byte.
OPEN = Policy()


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a command was refused, and what the RM layer answers."""

    rule: str
    rc: int
    detail: str = ""


@dataclass(slots=True)
class Usage:
    """What the tenant holds now, over all its open files (for the quotas)."""

    objects: int = 0
    sessions: int = 0
    counted: list[int] = field(default_factory=list)


@functools.lru_cache(maxsize=512)
def _num_handles(cc: int) -> int:
    try:
        return tpm2_command.lookup_command_class(TPM2_CC(cc)).num_handles()
    except Exception:  # a code tpm2-pytss does not know (a vendor's): no handle area we can name
        return 0


def handles(cmd: bytes) -> list[int]:
    """The handle area of a command, as many handles as its layout has (fewer if it is short)."""
    if len(cmd) < wire.TPM_HEADER_SIZE:
        return []
    n = _num_handles(wire.be32(cmd, 6))
    return [wire.be32(cmd, 10 + 4 * i) for i in range(n) if 14 + 4 * i <= len(cmd)]


def _parameter(cmd: bytes, index: int) -> object:
    """The ``index``-th parameter of a command by tpm2-pytss's parser (ValueError if it does not
    parse)."""
    try:
        parsed = read_command(io.BytesIO(cmd))
        return parsed.parameters[index]
    except Exception as exc:
        raise ValueError(str(exc)) from None


CC_NV_DEFINE = int(TPM2_CC.NV_DefineSpace)
CC_EVICT = int(TPM2_CC.EvictControl)
CC_START_AUTH_SESSION = int(TPM2_CC.StartAuthSession)
CC_CONTEXT_LOAD = int(TPM2_CC.ContextLoad)


def decide(policy: Policy, cmd: bytes, creates: bool = False, usage: Usage | None = None) -> Refusal | None:
    """The first rule the command breaks, or None.  ``cmd`` is the whole command as written;
    ``creates``: the command returns a new object handle (the chip's command table says so);
    ``usage``: what the tenant holds now (for max_objects / max_sessions)."""
    if len(cmd) < wire.TPM_HEADER_SIZE:
        return None  # the kernel's size checks answer it
    cc = wire.be32(cmd, 6)
    if policy.max_command_bytes and len(cmd) > policy.max_command_bytes:
        return Refusal("max_command_bytes", RC_SIZE, f"{len(cmd)} bytes > {policy.max_command_bytes}")
    if cc in policy.deny or (policy.allow is not None and cc not in policy.allow):
        return Refusal("deny" if cc in policy.deny else "allow", RC_DENY)
    area = handles(cmd)
    if policy.hierarchies is not None:
        for h in area:
            if h in HIERARCHIES.values() or h == _PLATFORM_NV:
                if (h if h != _PLATFORM_NV else HIERARCHIES["platform"]) not in policy.hierarchies:
                    return Refusal("hierarchies", RC_HIERARCHY, f"0x{h:08x}")
    for h in area:
        kind = h >> 24
        if kind == HT_NV_INDEX and policy.nv is not None and h not in policy.nv:
            if not (cc in NV_READ_ONLY and h in policy.nv_read):
                return Refusal("nv", RC_NV, f"0x{h:08x}")
        elif kind == HT_PERSISTENT and policy.persistent is not None and h not in policy.persistent:
            if cc == CC_EVICT or h not in policy.persistent_use:
                return Refusal("persistent", RC_PERSISTENT, f"0x{h:08x}")
        elif kind == HT_PCR and cc in PCR_CHANGE and policy.pcrs is not None and h not in policy.pcrs:
            return Refusal("pcrs", RC_PCR, f"PCR {h}")
    if cc == CC_NV_DEFINE and policy.nv is not None:
        try:
            index = int(_parameter(cmd, 1).nvPublic.nvIndex)  # type: ignore[attr-defined]
        except (ValueError, AttributeError):
            return Refusal("unparsed", RC_UNPARSED, "NV_DefineSpace publicInfo")
        if index not in policy.nv:
            return Refusal("nv", RC_NV, f"0x{index:08x}")
    if cc == CC_EVICT and policy.persistent is not None:
        try:
            target = int(_parameter(cmd, 0))  # type: ignore[call-overload]
        except (ValueError, TypeError):
            return Refusal("unparsed", RC_UNPARSED, "EvictControl persistentHandle")
        if target not in policy.persistent:
            return Refusal("persistent", RC_PERSISTENT, f"0x{target:08x}")
    if usage is not None:
        session = cc == CC_START_AUTH_SESSION or (cc == CC_CONTEXT_LOAD and _context_is_session(cmd))
        if session:
            if policy.max_sessions and usage.sessions >= policy.max_sessions:
                return Refusal("max_sessions", RC_SESSIONS, f"{usage.sessions} held")
        elif policy.max_objects and (creates or cc == CC_CONTEXT_LOAD) and usage.objects >= policy.max_objects:
            return Refusal("max_objects", RC_OBJECTS, f"{usage.objects} held")
    return None


def _context_is_session(cmd: bytes) -> bool:
    """Whether ContextLoad's TPMS_CONTEXT holds a session (savedHandle of type 0x02 or 0x03)."""
    try:
        handle = int(_parameter(cmd, 0).savedHandle)  # type: ignore[attr-defined]
    except (ValueError, AttributeError):
        return False  # the TPM will refuse it; no quota to count
    return handle >> 24 in (0x02, 0x03)


def make_policy(
    *,
    deny: Iterable[str] | None = None,
    allow: Iterable[str] | None = None,
    nv: Iterable[str | int] | None = None,
    nv_read: Iterable[str | int] = (),
    persistent: Iterable[str | int] | None = None,
    persistent_use: Iterable[str | int] = (),
    pcrs: Iterable[int] | None = None,
    hierarchies: Iterable[str] | None = None,
    max_open: int = 0,
    max_objects: int = 0,
    max_sessions: int = 0,
    commands_per_second: float = 0.0,
    max_command_bytes: int = 0,
) -> Policy:
    """A policy from the config's spelling; ValueError/KeyError say what is wrong."""
    for name, value in (("max_open", max_open), ("max_objects", max_objects), ("max_sessions", max_sessions),
                        ("max_command_bytes", max_command_bytes)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0 (0: no limit)")
    if isinstance(commands_per_second, bool) or not isinstance(commands_per_second, (int, float)):
        raise ValueError("commands_per_second must be a number >= 0 (0: no limit)")
    if commands_per_second < 0:
        raise ValueError("commands_per_second must be a number >= 0 (0: no limit)")
    pcr_set = None
    if pcrs is not None:
        pcr_set = frozenset(pcrs)
        if any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 31 for p in pcr_set):
            raise ValueError("pcrs: PCR numbers are 0..31")
    hier = None
    if hierarchies is not None:
        hier_names = [h.strip().lower() for h in hierarchies]
        unknown = [h for h in hier_names if h not in HIERARCHIES]
        if unknown:
            raise ValueError(f"hierarchies: {unknown[0]!r} is none of {', '.join(HIERARCHIES)}")
        hier = frozenset(HIERARCHIES[h] for h in hier_names)
    return Policy(
        deny=frozenset(command_code(n) for n in (DEFAULT_DENY if deny is None else deny)),
        allow=None if allow is None else frozenset(command_code(n) for n in allow),
        nv=None if nv is None else Ranges.parse(nv, "nv"),
        nv_read=Ranges.parse(nv_read, "nv_read"),
        persistent=None if persistent is None else Ranges.parse(persistent, "persistent"),
        persistent_use=Ranges.parse(persistent_use, "persistent_use"),
        pcrs=pcr_set,
        hierarchies=hier,
        max_open=max_open,
        max_objects=max_objects,
        max_sessions=max_sessions,
        commands_per_second=float(commands_per_second),
        max_command_bytes=max_command_bytes,
    )
