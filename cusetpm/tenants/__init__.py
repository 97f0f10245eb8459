# SPDX-License-Identifier: GPL-2.0-only
"""Tenant nodes: several /dev/tpmrm0-like nodes on one TPM, each with its own rules
(:mod:`.policy`) and its own audit trail (:mod:`.audit`)."""
