# SPDX-License-Identifier: GPL-2.0-only
"""Differential conformance: run the same syscall scenarios against the real kernel's
/dev/tpmrm<N> and against cusetpm's node, and compare normalized transcripts.

The parts, in the order a run uses them:

* :mod:`.scenario`: the scenario language (parse, load, the shipped corpus);
* :mod:`.normalize`: what a step's result records, and the transcript types (the JSON that
  crosses from the guest to the host);
* :mod:`.runner`: runs one scenario against one node with real system calls;
* :mod:`.sides`: the two sides started inside the guest, a fresh kernel chip
  (:class:`~.sides.KernelChip`) and a fresh daemon (:class:`~.sides.ForkedDaemon`);
* :mod:`.guest`: the in-guest driver (:func:`~.guest.guest_run`);
* :mod:`.report`: on the host, boot a guest, compare and report, with the table of expected
  differences;
* :mod:`.kernel_diff`: where the real kernels disagree with each other, and the rule why;
* :mod:`.strace`: strace output of a program -> a scenario;
* :mod:`.cli`: ``cusetpm conformance`` and ``python -m cusetpm.conformance``.

This package imports nothing heavy: ``cusetpm serve`` builds its parser with
:func:`.cli.add_conformance_parser`, and the harness is imported only when it runs.

Running
=======

``cusetpm conformance [--kernel 6.1|6.12|all] [--node fuse|cuse] [FILE...]`` boots one
qemu guest per kernel (:mod:`cusetpm.rig`); inside it each scenario runs against a fresh
``swtpm chardev --vtpm-proxy`` chip (the genuine kernel resource manager, ``/dev/tpmrmN``)
and against a fresh ``cusetpm serve`` daemon with the matching ``--kernel`` profile and its
own fresh swtpm.  Every difference is printed; exit status 1 if any.

``python -m cusetpm.conformance run --node PATH FILE...`` runs scenarios against any node
without a guest (e.g. the host's own /dev/tpmrm0) and prints the transcript, and
``python -m cusetpm.conformance from-strace LOG`` turns ``strace -f -xx -s 65536 -e
trace=openat,open,read,write,close,poll,ppoll,fcntl`` output of your program into a
scenario.  See cusetpm/conformance/corpus/README.md.

Known differences of the FUSE node
==================================

A FUSE file is not a character device; the kernel's FUSE layer answers some calls before
the daemon sees them.  For ``--node fuse`` only, :data:`.report.EXPECTED_DIFFERENCES` lists each such
step of the corpus (scenario, step, kernel result, our result) with the reason: write(fd, buf,
0) and read(fd, buf, 0) answered by FUSE itself, O_NONBLOCK from fcntl(F_SETFL) not reaching
the daemon, and EFAULT raised by FUSE's page pinning before the daemon sees the call.  They are
printed as expected, never silently dropped, and never apply to ``--node cuse``.  FUSE also
delivers RELEASE after close(2) has returned, so on FUSE the runner waits after each close
until the daemon has answered it (:func:`.sides.fuse_close_waiter`; the kernel's close is synchronous).
"""

from __future__ import annotations

from ..kernel.profiles import PROFILES

__all__ = ["KERNELS", "NODE_KINDS"]

#: The kernels compared with: one per profile cusetpm reproduces.
KERNELS: tuple[str, ...] = tuple(PROFILES)
NODE_KINDS = ("fuse", "cuse")
