# SPDX-License-Identifier: GPL-2.0-only
"""``cusetpm serve --config FILE``: the daemon, its backing TPM and its tenant nodes, in TOML.

The command-line flags describe the one-node case of the same thing (:func:`from_args`), so a
daemon started either way runs the same code.  Every key is checked: an unknown key, a wrong
type, an unknown command name or a malformed range is a :class:`ConfigError` naming the file,
the table and the key, in one line; a SIGHUP with such a file changes nothing.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kernel.profiles import DEFAULT_PROFILE, PROFILES
from ..sessions.settings import Settings
from .policy import DEFAULT_HIERARCHIES, OPEN, Policy, make_policy


class ConfigError(ValueError):
    """The config does not parse; the message is one line that says where and why."""


#: The request loop's default spin (cusetpm.frontends.channel.DEFAULT_SPIN) and its bound.
DEFAULT_SPIN_US = 100.0
MAX_SPIN_US = 10_000.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One tenant node: where it appears, the kernel it reproduces, and what it may do."""

    name: str
    kernel: str = DEFAULT_PROFILE
    sessions: str = "kernel"
    mode: int = 0o660
    owner: int | None = None
    group: int | None = None
    policy: Policy = OPEN
    #: JSON-lines audit trail: a path, ``-`` for stdout, None for none.
    audit: str | None = None
    #: pcapng capture of the raw commands and responses (None: none).
    audit_pcapng: str | None = None
    #: Zero auth values and sensitive data in the audit and the capture.
    audit_redact: bool = True


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything ``serve`` needs."""

    nodes: tuple[NodeConfig, ...]
    tcti: str | None = None
    state_dir: Path | None = None
    #: ``auto``, ``cuse`` or ``fuse``.
    front: str = "auto"
    fuse_dir: str | None = None
    #: What serves the FUSE directory: ``channel`` (the node's own loop) or ``pyfuse3``.
    fuse_lib: str = "channel"
    #: µs the request loop keeps polling for the next request before it sleeps (0: never).
    spin_us: float = DEFAULT_SPIN_US
    #: The one CPU the daemon, and the swtpm it starts, run on (None: where the scheduler puts them).
    cpu: int | None = None
    metrics: str | None = None
    control: str | None = None
    sessions: Settings = field(default_factory=Settings)
    #: ``kernel`` (save and flush after every command) or ``lazy`` (cusetpm.swap).
    swap: str = "kernel"
    #: ``lazy``: how many files may stay loaded in the TPM at once.
    swap_residents: int = 1
    #: Where it came from (None: the command line); SIGHUP rereads it.
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.swap not in ("kernel", "lazy"):
            raise ConfigError(f'swap must be "kernel" or "lazy", not {self.swap!r}')
        check_residents(self.swap, self.swap_residents, "swap_residents")


_NODE_KEYS = {
    "name", "kernel", "sessions", "mode", "owner", "group", "audit", "audit_pcapng", "audit_redact",
    "deny", "allow", "nv", "nv_read", "persistent", "persistent_use", "pcrs", "hierarchies",
    "max_open", "max_objects", "max_sessions", "commands_per_second", "max_command_bytes",
}  # fmt: skip
_POLICY_KEYS = _NODE_KEYS - {"name", "kernel", "sessions", "mode", "owner", "group", "audit", "audit_pcapng",
                             "audit_redact"}  # fmt: skip
_SESSION_KEYS = {
    "tracking": ("strict_tracking", str),
    "idle": ("evict_min_idle", float),
    "wait": ("session_wait", float),
    "quota_uid": ("max_sessions_per_uid", int),
    "quota_file": ("max_sessions_per_space", int),
    "quota_detached": ("max_detached_per_space", int),
}
_TOP = {"tpm": {"tcti", "state_dir", "swap", "swap_residents"},
        "front": {"node", "fuse_dir", "fuse_lib", "spin_us", "cpu"},
        "metrics": {"listen"}, "control": {"path"}, "sessions": set(_SESSION_KEYS), "node": set()}  # fmt: skip


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")


def _typed(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{where}: {key} must be {_kind_name(kind)}, not {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {key} must be {_kind_name(kind)}, not {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", int: "a whole number", float: "a number", bool: "true or false",
                        list: "a list"}.get(k, k.__name__) for k in kinds)  # fmt: skip


def user_id(value: str | int | None) -> int | None:
    """A user name or uid."""
    if value is None or isinstance(value, int):
        return value
    return int(value) if value.isdigit() else pwd.getpwnam(value).pw_uid


def group_id(value: str | int | None) -> int | None:
    """A group name or gid."""
    if value is None or isinstance(value, int):
        return value
    return int(value) if value.isdigit() else grp.getgrnam(value).gr_gid


def _mode(value: Any, where: str) -> int:
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigError(f'{where}: mode must be octal, e.g. "0660", not {value!r}') from None
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ConfigError(f'{where}: mode must be an octal string, e.g. "0660"')
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{where}: mode {value!r} is not a permission mode")
    return mode


def parse_node(table: dict[str, Any], where: str) -> NodeConfig:
    """One ``[[node]]`` table."""
    _check_keys(table, _NODE_KEYS, where)
    name = _typed(table, "name", str, where)
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"{where}: name must be a file name (the node's /dev or FUSE name)")
    where = f"{where} ({name})"
    kernel = _typed(table, "kernel", str, where, DEFAULT_PROFILE)
    if kernel not in PROFILES:
        raise ConfigError(f"{where}: kernel must be one of {', '.join(sorted(PROFILES))}, not {kernel!r}")
    sessions = _typed(table, "sessions", str, where, "kernel")
    if sessions not in ("kernel", "global"):
        raise ConfigError(f'{where}: sessions must be "kernel" or "global", not {sessions!r}')
    try:
        owner = user_id(_typed(table, "owner", (str, int), where))
        group = group_id(_typed(table, "group", (str, int), where))
    except KeyError as exc:
        raise ConfigError(f"{where}: no such user or group: {exc.args[0]}") from None
    kwargs: dict[str, Any] = {}
    for key in _POLICY_KEYS & table.keys():
        value = table[key]
        if key in ("deny", "allow", "nv", "nv_read", "persistent", "persistent_use", "pcrs", "hierarchies"):
            if not isinstance(value, list):
                raise ConfigError(f"{where}: {key} must be a list")
        kwargs[key] = value
    kwargs.setdefault("hierarchies", list(DEFAULT_HIERARCHIES))
    try:
        policy = make_policy(**kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc.args[0] if exc.args else exc}") from None
    audit = _typed(table, "audit", str, where)
    return NodeConfig(
        name=name,
        kernel=kernel,
        sessions=sessions,
        mode=_mode(table.get("mode", "0660"), where),
        owner=owner,
        group=group,
        policy=policy,
        audit=audit or None,
        audit_pcapng=_typed(table, "audit_pcapng", str, where) or None,
        audit_redact=_typed(table, "audit_redact", bool, where, True),
    )


def parse(text: str, path: Path | None = None) -> DaemonConfig:
    """A whole config; ConfigError (one line) if anything is wrong."""
    src = str(path) if path is not None else "config"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: not TOML: {exc}") from None
    _check_keys(doc, set(_TOP), src)
    for key, allowed in _TOP.items():
        if key != "node" and key in doc:
            if not isinstance(doc[key], dict):
                raise ConfigError(f"{src}: [{key}] must be a table")
            _check_keys(doc[key], allowed, f"{src}: [{key}]")
    tpm, front = doc.get("tpm", {}), doc.get("front", {})
    tables = doc.get("node", [])
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{src}: at least one [[node]] table is needed")
    nodes = tuple(parse_node(t, f"{src}: [[node]] {i + 1}") for i, t in enumerate(tables))
    names = [n.name for n in nodes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{src}: two [[node]] tables are named {dup!r}")
    kind = _typed(front, "node", str, f"{src}: [front]", "auto")
    if kind not in ("auto", "cuse", "fuse"):
        raise ConfigError(f'{src}: [front]: node must be "auto", "cuse" or "fuse", not {kind!r}')
    fuse_lib = _typed(front, "fuse_lib", str, f"{src}: [front]", "channel")
    if fuse_lib not in FUSE_LIBS:
        raise ConfigError(f'{src}: [front]: fuse_lib must be "channel" or "pyfuse3", not {fuse_lib!r}')
    spin_us = check_spin(_typed(front, "spin_us", (int, float), f"{src}: [front]"), f"{src}: [front]: spin_us")
    cpu = check_cpu(_typed(front, "cpu", int, f"{src}: [front]"), f"{src}: [front]: cpu")
    state_dir = _typed(tpm, "state_dir", str, f"{src}: [tpm]")
    swap = _typed(tpm, "swap", str, f"{src}: [tpm]", "kernel")
    if swap not in ("kernel", "lazy"):
        raise ConfigError(f'{src}: [tpm]: swap must be "kernel" or "lazy", not {swap!r}')
    residents = _typed(tpm, "swap_residents", int, f"{src}: [tpm]", 1)
    check_residents(swap, residents, f"{src}: [tpm]: swap_residents")
    return DaemonConfig(
        nodes=nodes,
        tcti=_typed(tpm, "tcti", str, f"{src}: [tpm]") or None,
        state_dir=Path(state_dir) if state_dir else None,
        front=kind,
        fuse_dir=_typed(front, "fuse_dir", str, f"{src}: [front]") or None,
        fuse_lib=fuse_lib,
        spin_us=spin_us,
        cpu=cpu,
        metrics=_typed(doc.get("metrics", {}), "listen", str, f"{src}: [metrics]") or None,
        control=_typed(doc.get("control", {}), "path", str, f"{src}: [control]") or None,
        sessions=_session_settings(doc.get("sessions", {}), f"{src}: [sessions]"),
        swap=swap,
        swap_residents=residents,
        path=path,
    )


def _session_settings(table: dict[str, Any], where: str) -> Settings:
    """``[sessions]``: the settings every ``sessions = "global"`` node shares (one registry
    for the one TPM)."""
    kwargs: dict[str, Any] = {}
    for key, (attr, kind) in _SESSION_KEYS.items():
        if key not in table:
            continue
        value = table[key]
        if key == "tracking":
            if value not in ("strict", "lazy"):
                raise ConfigError(f'{where}: tracking must be "strict" or "lazy"')
            kwargs[attr] = value == "strict"
        elif isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ConfigError(f"{where}: {key} must be {_kind_name(kind)}")
        else:
            kwargs[attr] = value
    try:
        return Settings(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


#: The FUSE directory's servers (see cusetpm.frontends.fuse).
FUSE_LIBS = ("channel", "pyfuse3")


#: The most files ``--swap-residents`` lets stay loaded: more than any TPM has room for.
MAX_RESIDENTS = 64


def check_residents(swap: str, residents: int, where: str = "--swap-residents") -> None:
    """``swap_residents`` / ``--swap-residents``: 1..MAX_RESIDENTS, and more than 1 only with
    lazy swapping (the kernel's way keeps no file loaded)."""
    if isinstance(residents, bool) or not 1 <= residents <= MAX_RESIDENTS:
        raise ConfigError(f"{where} must be 1..{MAX_RESIDENTS}, not {residents}")
    if residents > 1 and swap != "lazy":
        raise ConfigError(f'{where} needs swap "lazy" (--swap lazy)')


def check_spin(value: float | None, where: str = "--spin-us") -> float:
    """``spin_us`` / ``--spin-us``: the default if not given; ConfigError out of range."""
    if value is None:
        return DEFAULT_SPIN_US
    if not 0 <= value <= MAX_SPIN_US:
        raise ConfigError(f"{where} must be 0..{MAX_SPIN_US:g}, not {value:g}")
    return float(value)


def check_cpu(value: int | None, where: str = "--cpu") -> int | None:
    """``cpu`` / ``--cpu``: None if not given; ConfigError unless this process may run there."""
    if value is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if value not in allowed:
        raise ConfigError(f"{where}: CPU {value} is not one this process may run on ({_cpu_list(allowed)})")
    return value


def _cpu_list(cpus: list[int]) -> str:
    """0-3,6 for [0, 1, 2, 3, 6]."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def load(path: str | Path) -> DaemonConfig:
    """Read and parse a config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror or exc}") from None
    return parse(text, p)


def from_args(args: argparse.Namespace, kind: str, where: str) -> DaemonConfig:
    """The command line's one node (``kind``/``where`` as cli.choose_node decided), with no
    policy: the one-tenant case, byte for byte the kernel's."""
    name = where if kind == "cuse" else (args.name or "tpmrm0")
    node = NodeConfig(
        name=name,
        kernel=args.kernel,
        sessions=args.sessions,
        mode=int(args.mode, 8),
        owner=user_id(args.owner),
        group=group_id(args.group),
    )
    residents = getattr(args, "swap_residents", 1)
    check_residents(args.swap, residents)
    settings = Settings(
        strict_tracking=args.session_tracking == "strict",
        evict_min_idle=args.session_idle,
        session_wait=args.session_wait,
        max_sessions_per_uid=args.session_quota_uid,
        max_sessions_per_space=args.session_quota_file,
        max_detached_per_space=args.session_quota_detached,
    )
    return DaemonConfig(
        nodes=(node,),
        tcti=args.tcti,
        state_dir=args.state_dir,
        front=kind,
        fuse_dir=where if kind == "fuse" else None,
        fuse_lib=getattr(args, "fuse_lib", None) or "channel",
        spin_us=check_spin(getattr(args, "spin_us", None)),
        cpu=check_cpu(getattr(args, "cpu", None)),
        metrics=args.metrics,
        control=args.control,
        sessions=settings,
        swap=args.swap,
        swap_residents=residents,
    )
