# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.tenants.config: what a config says, and the one line it gets when it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from cusetpm.cli import build_parser, command_line_overrides
from cusetpm.tenants import policy as P
from cusetpm.tenants.config import ConfigError, from_args, load, parse

GOOD = """
[tpm]
state_dir = "/var/lib/cusetpm"

[front]
node = "fuse"
fuse_dir = "/run/cusetpm"

[metrics]
listen = "127.0.0.1:9464"

[sessions]
wait = 1.5
quota_uid = 4

[[node]]
name = "tenant-a"
kernel = "6.1"
sessions = "global"
mode = "0600"
owner = 0
nv = ["0x01500000-0x015000ff"]
pcrs = [16, 23]
max_open = 4
commands_per_second = 50
audit = "-"

[[node]]
name = "tenant-b"
deny = []
hierarchies = ["owner", "endorsement", "platform", "lockout"]
"""


def test_a_config_gives_each_node_its_kernel_front_end_and_policy() -> None:
    c = parse(GOOD, Path("x.toml"))
    assert (c.front, c.fuse_dir, c.metrics, str(c.state_dir)) == (
        "fuse",
        "/run/cusetpm",
        "127.0.0.1:9464",
        "/var/lib/cusetpm",
    )
    assert (c.sessions.session_wait, c.sessions.max_sessions_per_uid) == (1.5, 4)
    a, b = c.nodes
    assert (a.name, a.kernel, a.sessions, a.mode, a.owner, a.audit) == ("tenant-a", "6.1", "global", 0o600, 0, "-")
    assert a.policy.nv is not None and 0x01500010 in a.policy.nv and 0x01500100 not in a.policy.nv
    assert a.policy.pcrs == {16, 23} and a.policy.max_open == 4 and a.policy.commands_per_second == 50
    assert P.command_code("Clear") in a.policy.deny  # the default deny list
    assert a.policy.hierarchies == {P.HIERARCHIES["owner"], P.HIERARCHIES["endorsement"]}  # the default
    assert b.policy.deny == frozenset() and b.policy.hierarchies == frozenset(P.HIERARCHIES.values())
    assert b.kernel == "6.12" and b.sessions == "kernel" and b.mode == 0o660


@pytest.mark.parametrize(
    "change, message",
    [
        ('name = "tenant-b"\nnvv = []', "unknown key 'nvv'"),
        ('name = "tenant-b"\nkernel = "5.4"', "kernel must be one of"),
        ('name = "tenant-b"\ndeny = ["Klear"]', "unknown TPM command name 'Klear'"),
        ('name = "tenant-b"\nnv = ["0x1-zz"]', "nv:"),
        ('name = "tenant-b"\npcrs = [40]', "PCR numbers are 0..31"),
        ('name = "tenant-b"\nmax_open = -1', "max_open must be"),
        ('name = "tenant-b"\nhierarchies = ["null"]', "hierarchies"),
        ('name = "tenant-b"\nmode = "999"', "mode must be octal"),
        ('name = "tenant-a"', "two [[node]] tables are named 'tenant-a'"),
        ('name = "a/b"', "name must be a file name"),
        ('name = "tenant-b"\nowner = "no-such-user-here"', "no such user"),
        ('name = "tenant-b"\nsessions = "lazy"', "sessions must be"),
    ],
)
def test_a_wrong_config_is_one_line_that_says_where_and_why(change: str, message: str) -> None:
    text = GOOD.rsplit("[[node]]", 1)[0] + "[[node]]\n" + change + "\n"
    with pytest.raises(ConfigError) as err:
        parse(text, Path("x.toml"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("x.toml")


def test_a_file_that_is_not_toml_or_has_no_node_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[[node]\n")
    with pytest.raises(ConfigError, match="not TOML"):
        load(f)
    f.write_text("[tpm]\n")
    with pytest.raises(ConfigError, match="at least one"):
        load(f)
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "missing.toml")
    f.write_text('[front]\nnode = "usb"\n[[node]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="front"):
        load(f)


def test_the_command_line_is_the_one_tenant_case_with_no_policy() -> None:
    args = build_parser().parse_args(["serve", "--fuse", "/tmp/x", "--kernel", "6.1", "--mode", "0640"])
    c = from_args(args, "fuse", "/tmp/x")
    (node,) = c.nodes
    assert (node.name, node.kernel, node.mode, node.policy) == ("tpmrm0", "6.1", 0o640, P.OPEN)
    assert c.path is None and c.fuse_dir == "/tmp/x" and c.fuse_lib == "channel"


def test_fuse_lib_picks_what_serves_the_fuse_directory() -> None:
    head = '[front]\nnode = "fuse"\nfuse_lib = "pyfuse3"\n\n[[node]]\nname = "a"\n'
    assert parse(head).fuse_lib == "pyfuse3"
    assert parse(head.replace('fuse_lib = "pyfuse3"\n', "")).fuse_lib == "channel"
    with pytest.raises(ConfigError, match="fuse_lib must be"):
        parse(head.replace("pyfuse3", "libfuse"))
    args = build_parser().parse_args(["serve", "--fuse", "/tmp/x", "--fuse-lib", "pyfuse3"])
    assert from_args(args, "fuse", "/tmp/x").fuse_lib == "pyfuse3"
    assert command_line_overrides(args) == {"fuse_lib": "pyfuse3"}


def test_cpu_is_one_this_process_may_run_on_and_the_command_line_wins() -> None:
    import os

    allowed = sorted(os.sched_getaffinity(0))
    head = f'[front]\ncpu = {allowed[-1]}\n\n[[node]]\nname = "a"\n'
    assert parse(head).cpu == allowed[-1]
    assert parse(head.replace(f"cpu = {allowed[-1]}\n", "")).cpu is None
    for bad, why in (("4096", "CPU 4096 is not one this process may run on"), ("-1", "CPU -1"), ('"0"', "must be")):
        with pytest.raises(ConfigError, match=why):
            parse(head.replace(f"cpu = {allowed[-1]}", f"cpu = {bad}"))
    args = build_parser().parse_args(["serve", "--fuse", "/tmp/x", "--cpu", str(allowed[0])])
    assert from_args(args, "fuse", "/tmp/x").cpu == allowed[0]
    assert command_line_overrides(args) == {"cpu": allowed[0]}
    assert from_args(build_parser().parse_args(["serve", "--fuse", "/tmp/x"]), "fuse", "/tmp/x").cpu is None
    with pytest.raises(ConfigError, match="--cpu: CPU 4096"):
        command_line_overrides(build_parser().parse_args(["serve", "--config", "x.toml", "--cpu", "4096"]))


def test_spin_us_is_checked_and_the_command_line_wins() -> None:
    head = '[front]\nspin_us = 250\n\n[[node]]\nname = "a"\n'
    assert parse(head).spin_us == 250
    assert parse(head.replace("spin_us = 250\n", "")).spin_us == 100.0
    for bad, why in (("-1", "spin_us must be"), ("20000", "spin_us must be"), ('"fast"', "must be")):
        with pytest.raises(ConfigError, match=why):
            parse(head.replace("250", bad))
    args = build_parser().parse_args(["serve", "--fuse", "/tmp/x", "--spin-us", "0"])
    assert from_args(args, "fuse", "/tmp/x").spin_us == 0
    assert command_line_overrides(args) == {"spin_us": 0.0}
    with pytest.raises(ConfigError, match="--spin-us"):
        from_args(build_parser().parse_args(["serve", "--spin-us", "-5"]), "fuse", "/tmp/x")
    with pytest.raises(ConfigError, match="--spin-us"):  # given with --config as well
        command_line_overrides(build_parser().parse_args(["serve", "--config", "x.toml", "--spin-us", "-5"]))


def test_swap_residents_is_a_count_of_files_for_lazy_swapping_only() -> None:
    head = '[tpm]\nswap = "lazy"\nswap_residents = 4\n\n[[node]]\nname = "a"\n'
    assert parse(head).swap_residents == 4
    assert parse(head.replace("swap_residents = 4\n", "")).swap_residents == 1
    for bad, message in (("0", "must be 1..64, not 0"), ("65", "must be 1..64"), ("true", "must be a whole number"),
                         ('"2"', "must be a whole number")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            parse(head.replace("= 4", f"= {bad}"))
    with pytest.raises(ConfigError, match=r'swap_residents needs swap "lazy"'):
        parse(head.replace('"lazy"', '"kernel"'))
    args = build_parser().parse_args(["serve", "--swap", "lazy", "--swap-residents", "3"])
    assert from_args(args, "fuse", "/tmp/x").swap_residents == 3
    with pytest.raises(ConfigError, match=r"--swap-residents needs swap \"lazy\""):
        from_args(build_parser().parse_args(["serve", "--swap-residents", "3"]), "fuse", "/tmp/x")
    with pytest.raises(ConfigError, match="--swap-residents must be 1..64, not 0"):
        from_args(build_parser().parse_args(["serve", "--swap", "lazy", "--swap-residents", "0"]), "fuse", "/tmp/x")


def test_swap_lazy_is_a_setting_of_the_tpm_and_goes_with_global_sessions() -> None:
    head = '[tpm]\nswap = "lazy"\n\n[[node]]\nname = "a"\n'
    assert parse(head).swap == "lazy"
    both = parse(head + 'sessions = "global"\n')
    assert (both.swap, both.nodes[0].sessions) == ("lazy", "global")
    with pytest.raises(ConfigError, match="swap must be"):
        parse(head.replace('"lazy"', '"eager"'))
    args = build_parser().parse_args(["serve", "--swap", "lazy", "--sessions", "global"])
    config = from_args(args, "fuse", "/tmp/x")
    assert (config.swap, config.nodes[0].sessions) == ("lazy", "global")
