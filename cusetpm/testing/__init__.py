# SPDX-License-Identifier: GPL-2.0-only
"""Support for the tests, the benchmark and the conformance harness alike.

* :mod:`.swtpm`: a fresh swtpm on free loopback ports, started and stopped synchronously.
* :mod:`.relay`: TCP relays in front of a swtpm (a multiplexer, a command counter).
* :mod:`.daemon`: ``python -m cusetpm serve`` as a subprocess, ready when ``--ready-fd`` says so.
* :mod:`.fake_tpm`: a small fake TPM in pure Python for byte-level tests of the port.
* ``bench_*``: the parts of ``scripts/bench.py``.

Only the tests, ``scripts/`` and :mod:`cusetpm.conformance` import this package; the rest of
cusetpm never does.
"""
