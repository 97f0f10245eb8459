# SPDX-License-Identifier: GPL-2.0-only
"""What a step's result records, and the shape of the transcripts.

A read(2) is reported as its byte count and the parts of the response that do not depend on
TPM randomness (:class:`_FileTrack`, :func:`response_fields`); see :mod:`.scenario` for the
rules.  The transcripts cross a JSON boundary (written in the guest, read on the host), so
their shape is typed here: :class:`StepResult`, :class:`Transcript` and :class:`GuestRun`.
"""

from __future__ import annotations

import select
from dataclasses import dataclass, field
from typing import TypedDict

__all__ = ["StepResult", "Transcript", "GuestRun", "poll_names", "response_fields"]


class StepResult(TypedDict):
    """One step of a transcript."""

    line: int  # line number in the scenario file
    op: str  # the operation as written
    result: str  # the normalized result, compared verbatim
    expected: str | None  # the `=>` tokens that apply, or None
    expect_ok: bool | None  # whether they held (None: nothing expected)


class Transcript(TypedDict):
    """One scenario run on one side: :func:`cusetpm.conformance.runner.run_scenario`."""

    steps: list[StepResult]
    error: str | None  # the side did not run the scenario through, and why
    seconds: float


def failed_transcript(error: str) -> Transcript:
    """The transcript of a side that could not run a scenario at all."""
    return {"steps": [], "error": error, "seconds": 0}


class _GuestRunBase(TypedDict):
    kernel: str
    release: str  # the guest's uname -r
    node: str  # "fuse" or "cuse"
    kernel_side: dict[str, Transcript]  # scenario name -> the real kernel's transcript
    ours: dict[str, Transcript]  # scenario name -> cusetpm's transcript
    order: list[str]  # the scenario names, in the order they ran


class GuestRun(_GuestRunBase, total=False):
    """What the in-guest driver writes (:func:`cusetpm.conformance.guest.guest_run`)."""

    import_seconds: float
    seconds: float
    phases: dict[str, float]  # seconds spent starting, waiting for sides, stopping
    retries: dict[str, int]  # "chips"/"daemons": how many were started again


# Commands whose TPMA_CC has rHandle: the handle at offset 10 of a successful response.
RHANDLE_CCS = {
    0x107: "MAC_Start",
    0x131: "CreatePrimary",
    0x157: "Load",
    0x15B: "HMAC_Start",
    0x161: "ContextLoad",
    0x167: "LoadExternal",
    0x176: "StartAuthSession",
    0x186: "HashSequenceStart",
    0x191: "CreateLoaded",
}
CC_GET_CAPABILITY = 0x17A
CC_CONTEXT_SAVE = 0x162
CAP_HANDLES = 1

_POLL_NAMES = [
    (select.POLLIN, "IN"),
    (select.POLLPRI, "PRI"),
    (select.POLLOUT, "OUT"),
    (select.POLLERR, "ERR"),
    (select.POLLHUP, "HUP"),
    (select.POLLNVAL, "NVAL"),
    (select.POLLRDNORM, "RDNORM"),
    (select.POLLRDBAND, "RDBAND"),
    (select.POLLWRNORM, "WRNORM"),
    (select.POLLWRBAND, "WRBAND"),
]


def _be32(b: bytes | bytearray, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def poll_names(mask: int) -> str:
    if not mask:
        return "none"
    names = [name for bit, name in _POLL_NAMES if mask & bit]
    rest = mask & ~sum(bit for bit, _ in _POLL_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names)


def response_fields(cc: int | None, rsp: bytes) -> list[str]:
    """Deterministic fields of a complete response body (the header is reported apart)."""
    if cc is None or len(rsp) < 10 or _be32(rsp, 6) != 0:
        return []
    body = rsp[10:]
    if cc in RHANDLE_CCS and len(body) >= 4:
        return [f"handle=0x{_be32(body, 0):08x}"]
    if cc == CC_GET_CAPABILITY and len(body) >= 9:
        more, cap, count = body[0], _be32(body, 1), _be32(body, 5)
        fields = [f"more={more}", f"cap={cap}", f"count={count}"]
        if cap == CAP_HANDLES:
            handles = [f"{_be32(body, 9 + 4 * i):08x}" for i in range((len(body) - 9) // 4)]
            fields.append("handles=" + (",".join(handles) or "-"))
        else:
            fields.append("body=" + body[9:].hex())
        return fields
    if cc == CC_CONTEXT_SAVE and len(body) >= 18:
        blob = int.from_bytes(body[16:18], "big")
        return [f"saved=0x{_be32(body, 8):08x}", f"hier=0x{_be32(body, 12):08x}", f"blob={blob}"]
    return []


@dataclass
class _FileTrack:
    """What the runner knows about one open file: its fd and the response being read."""

    fd: int
    last_cc: int | None = None
    resp: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def written(self, data: bytes) -> None:
        self.last_cc = _be32(data, 6) if len(data) >= 10 else None
        self.resp = bytearray()
        self.complete = False

    def got(self, data: bytes, raw: bool) -> str:
        """The normalized result of a read(2) that returned ``data``."""
        if not data:
            self.resp = bytearray()
            self.complete = False
            return "0"
        if self.complete:
            self.resp = bytearray()
            self.complete = False
        start = len(self.resp)
        self.resp += data
        fields = [str(len(data))]
        end = min(len(self.resp), 10)
        if start == 0 and end == 10:
            r = self.resp
            fields += [f"tag={r[0]:02x}{r[1]:02x}", f"size={_be32(r, 2)}", f"rc=0x{_be32(r, 6):x}"]
        elif start < end:
            fields.append(f"hdr[{start}:{end}]={self.resp[start:end].hex()}")
        if len(self.resp) >= 10 and len(self.resp) == _be32(self.resp, 2):
            self.complete = True
            fields += response_fields(self.last_cc, bytes(self.resp))
        if raw:
            fields.append("bytes=" + data.hex())
        return " ".join(fields)
