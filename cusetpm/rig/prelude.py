# SPDX-License-Identifier: GPL-2.0-only
"""Guest-side helpers: shell text to prefix a guest command with."""

from __future__ import annotations

import shlex

__all__ = ["guest_swtpm_prelude"]


def guest_swtpm_prelude(state_dir: str = "/run/cusetpm-swtpm", wait_seconds: int = 30) -> str:
    """Shell text that gives the guest a real kernel /dev/tpmrm0, exit 0 on success.

    Starts `swtpm chardev --vtpm-proxy` in the background (state in a guest
    tmpfs) and polls for /dev/tpmrm0.  `not-need-init` lets the kernel send
    TPM2_Startup itself (with startup-clear, 6.12 failed to register the chip).
    On failure it prints swtpm's log to stderr and evaluates to false, so
    `guest_swtpm_prelude() + " && cmd"` is the intended use.
    """
    d = shlex.quote(state_dir)
    log = shlex.quote(state_dir + "/swtpm.log")
    tries = int(wait_seconds * 10)
    return (
        f"{{ mkdir -p {d} && "
        f"{{ swtpm chardev --vtpm-proxy --tpm2 --tpmstate dir={d} --flags not-need-init "
        f">{log} 2>&1 & }} ; "
        f"_rig_n=0; while [ ! -c /dev/tpmrm0 ] && [ $_rig_n -lt {tries} ]; do "
        f"sleep 0.1; _rig_n=$((_rig_n+1)); done; "
        f"[ -c /dev/tpmrm0 ] || {{ echo 'rig: /dev/tpmrm0 did not appear' >&2; "
        f"cat {log} >&2; dmesg | grep -i tpm >&2; false; }}; }}"
    )
