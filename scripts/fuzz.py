#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""The long fuzz runs of ``make fuzz`` (issue 10), with their figures.

Seeded random mutation loops over the same rigs and mutators as the hypothesis tests
(:mod:`cusetpm.testing.hostile`, :mod:`cusetpm.testing.hostile_cuse`), fast enough for 10^6
inputs per target in a few minutes:

* ``core-6.1``, ``core-6.12``: hostile writes and reads through ``FileState`` +
  ``tpm_dev_transmit`` on the fake TPM, a bystander file with an object and a session beside
  them; every answer checked, the TPM's handles after every command, the bystander every
  10 000 inputs, everything at the end;
* ``cuse-parse``: hostile FUSE/CUSE request bytes through ``cuse_proto.parse_request`` and the
  reply the loop would send without a device;
* ``cuse-loop``: the same through the CUSE request loop on a socket pair, every reply checked
  and the loop shown still serving after every batch;
* ``fuse-loop``: a FUSE mount's requests (lookups, attributes, the directory listing, and the
  file operations) through a FUSE node's request loop, the same way.

Prints one line per target (inputs, seconds, failures) and exits 1 if anything failed; each
failure is printed with the input that caused it, to become a regression test.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from cusetpm.frontends import cuse_proto
from cusetpm.testing.hostile import CoreRig, mutant
from cusetpm.testing.hostile_cuse import LoopRig, check_parse, check_reply, hostile_request, run_loop


@dataclass
class Result:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: str = ""

    def fail(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)
        else:
            self.failures.append("")  # counted, not kept


def fuzz_core(profile: str, n: int, seed: int) -> Result:
    result = Result(f"core-{profile}")
    rng = random.Random(seed)
    rig = CoreRig(profile)
    f = rig.open()
    skipped = fake_errors = sent = i = 0
    while sent + rig.inputs < n:  # n inputs sent: the ones left out are not counted
        i += 1
        data = mutant(rng, rig.pools)
        try:
            rig.write(f, data, nonblock=rng.random() < 0.1)
            if rng.random() < 0.9:
                rig.read(f, rng.choice((4096, 4096, 10, 1, 0)))
            if i % 64 == 63:
                rig.retire(f)
                f = rig.open()
            if i % 10_000 == 9_999:
                rig.check_bystander()
        except Exception as exc:  # a Finding, or the port raising: both are failures
            result.fail(f"input {data.hex()}: {''.join(traceback.format_exception_only(exc)).strip()}")
            skipped, fake_errors, sent = skipped + rig.skipped, fake_errors + len(rig.fake_errors), sent + rig.inputs
            rig = CoreRig(profile)  # start clean: the old rig's state is suspect
            f = rig.open()
    try:
        rig.retire(f)
        rig.finish()
    except Exception as exc:
        result.fail(f"at the end: {exc!r}")
    skipped, fake_errors, sent = skipped + rig.skipped, fake_errors + len(rig.fake_errors), sent + rig.inputs
    result.inputs = sent
    result.notes = f"{skipped} not sent (would hurt the bystander on Linux too); {fake_errors} the fake could not parse"
    return result


def fuzz_cuse_parse(n: int, seed: int) -> Result:
    result = Result("cuse-parse")
    rng = random.Random(seed)
    parsed = 0
    for i in range(n):
        buf = hostile_request(rng, 2 * i + 2, [1, 2, 3])
        try:
            req = check_parse(buf)
            if req is not None:
                parsed += 1
                out = cuse_proto.default_reply(req)
                if out is not None and (problem := check_reply(out)):
                    result.fail(f"input {buf.hex()}: reply {out.hex()}: {problem}")
        except Exception as exc:
            result.fail(f"input {buf.hex()}: {exc!r}")
    result.inputs = n
    result.notes = f"{parsed} parsed as requests, {n - parsed} refused with ProtocolError"
    return result


def fuzz_cuse_loop(n: int, seed: int, batch: int = 250, fuse: bool = False) -> Result:
    result = Result("fuse-loop" if fuse else "cuse-loop")
    rng = random.Random(seed)

    async def body(rig: LoopRig) -> None:
        while rig.sent < n:
            fhs = sorted(rig.server.files)[-8:]
            frames = [hostile_request(rng, 0, fhs, fuse) for _ in range(min(batch, n - rig.sent))]
            await rig.feed(frames)
            try:
                await rig.still_serves()
            except Exception as exc:
                rig.problems.append(f"after a batch: {exc!r}; the batch: {' '.join(f.hex() for f in frames)}")
                return
            for problem in rig.problems:
                result.fail(problem)
            rig.problems.clear()
        result.inputs = rig.sent

    try:
        run_loop(body, fuse)
    except Exception as exc:
        result.fail(f"the loop died: {exc!r}")
    result.notes = f"in batches of {batch}, the loop checked alive after each"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target (default 10^6)")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--targets", default="core-6.1,core-6.12,cuse-parse,cuse-loop,fuse-loop")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the port logs what the kernel logs, per input

    runs: dict[str, Callable[[], Result]] = {
        "core-6.1": lambda: fuzz_core("6.1", args.inputs, args.seed),
        "core-6.12": lambda: fuzz_core("6.12", args.inputs, args.seed + 1),
        "cuse-parse": lambda: fuzz_cuse_parse(args.inputs, args.seed),
        "cuse-loop": lambda: fuzz_cuse_loop(args.inputs, args.seed),
        "fuse-loop": lambda: fuzz_cuse_loop(args.inputs, args.seed, fuse=True),
    }
    results = []
    for name in args.targets.split(","):
        start = time.monotonic()
        r = runs[name]()
        r.seconds = time.monotonic() - start
        results.append(r)
        rate = r.inputs / r.seconds if r.seconds else 0.0
        print(
            f"{r.target:11s} {r.inputs:9d} inputs  {r.seconds:7.1f} s  {rate:8.0f}/s  "
            f"failures: {len(r.failures)}   ({r.notes})",
            flush=True,
        )
        for failure in r.failures:
            if failure:
                print(f"    {failure}")
    total = sum(len(r.failures) for r in results)
    print(f"fuzz: {sum(r.inputs for r in results)} inputs, {total} failures (seed {args.seed})")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
