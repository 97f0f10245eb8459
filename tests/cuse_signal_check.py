# SPDX-License-Identifier: GPL-2.0-only
"""Run inside a guest against a cusetpm CUSE node: commands interrupted by signals.

A SIGALRM every millisecond interrupts the writes and reads of slow commands (RSA primary
keys).  The kernel turns each signal into a FUSE_INTERRUPT; /dev/tpmrm0's operations are
uninterruptible, so every call must still return its real result and the space must stay
consistent.  Prints OK and exits 0, or raises.
"""

from __future__ import annotations

import os
import signal
import struct
import sys

from tpm2_pytss.types import TPM2B_PUBLIC

node = sys.argv[1]
interrupts = 0


def on_alarm(signum: int, frame: object) -> None:
    global interrupts
    interrupts += 1


signal.signal(signal.SIGALRM, on_alarm)
signal.siginterrupt(signal.SIGALRM, True)

rsa = TPM2B_PUBLIC.parse("rsa2048", objectAttributes="userwithauth|sign|fixedtpm|fixedparent|sensitivedataorigin")
auth = struct.pack(">IIHBH", 9, 0x40000009, 0, 1, 0)
body = struct.pack(">I", 0x40000001) + auth + b"\x00\x04\x00\x00\x00\x00" + rsa.marshal() + b"\x00\x00" + bytes(4)
create_primary = struct.pack(">HII", 0x8002, 10 + len(body), 0x131) + body

fd = os.open(node, os.O_RDWR)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
handles = []
for _ in range(3):
    assert os.write(fd, create_primary) == len(create_primary)
    rsp = os.read(fd, 4096)
    tag, size, rc = struct.unpack(">HII", rsp[:10])
    assert rc == 0 and size == len(rsp), rsp[:10].hex()
    handles.append(struct.unpack(">I", rsp[10:14])[0])
get_random = struct.pack(">HIIH", 0x8001, 12, 0x17B, 32)
for _ in range(300):
    assert os.write(fd, get_random) == 12
    rsp = os.read(fd, 4096)
    assert len(rsp) == 44 and struct.unpack(">I", rsp[6:10])[0] == 0, rsp[:10].hex()
signal.setitimer(signal.ITIMER_REAL, 0)
assert handles == [0x80FFFFFF, 0x80FFFFFE, 0x80FFFFFD], [hex(h) for h in handles]
getcap = struct.pack(">HIIIII", 0x8001, 22, 0x17A, 1, 0x80000000, 8)
assert os.write(fd, getcap) == 22
rsp = os.read(fd, 4096)
count = struct.unpack(">I", rsp[15:19])[0]
assert list(struct.unpack(f">{count}I", rsp[19:])) == handles
assert interrupts > 20, interrupts
os.close(fd)
print(f"OK {interrupts} interrupts")
