# SPDX-License-Identifier: GPL-2.0-only
"""Real-kernel rig: boot Debian's own kernels under qemu and run a command.

Why: the only trustworthy reference for /dev/tpmrm0 semantics is the real
kernel resource manager.  This module downloads Debian's kernel packages
(no install: ``apt-get download`` + ``dpkg -x`` into a cache), builds a tiny
busybox initramfs, boots the kernel under qemu (TCG, no KVM needed) and runs
a shell command as root inside a chroot of the *host's own root file system*,
so host binaries (swtpm, tpm2-tools, Python venvs) run unchanged in the guest.

Guest layout:

* host ``/`` is exported read-only over virtio-9p and used as the lower layer
  of an overlayfs whose upper layer is a guest tmpfs: the whole tree (also
  /tmp, /root, the repo) looks as on the host and is writable, but writes stay
  in the guest and vanish at power-off;
* fresh ``/proc``, ``/sys``, ``/dev`` (devtmpfs), ``/dev/pts``, ``/dev/shm``
  and ``/run`` (tmpfs); ``lo`` is up, there is no other network;
* a private read-write 9p share carries the command in and its output and
  exit status out (never parsed from the serial console, so kernel log noise
  cannot corrupt results);
* ``share=DIR`` mounts a host directory read-write at the same path.

Debugging: ``python -m cusetpm.rig run 6.12 --swtpm --console 'CMD'`` or
``scripts/rig-shell.sh 6.12 --swtpm`` for an interactive root shell.

Required Debian packages: qemu-system-x86 (qemu-system-x86_64, SeaBIOS and
the option ROMs come with it), busybox-static, kmod (depmod), apt and dpkg.
The guest-side helpers additionally need swtpm and tpm2-tools.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import gzip
import io
import lzma
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

__all__ = [
    "KERNELS",
    "GuestResult",
    "KernelFiles",
    "RigError",
    "cache_dir",
    "ensure_kernel",
    "run_in_guest",
    "guest_swtpm_prelude",
    "GUEST_MODULES",
    "module_load_order",
    "build_initramfs",
    "run_interactive",
]

KERNELS = ("6.1", "6.12")

# Debian meta packages tracking each kernel series (bookworm).
_META_PACKAGES = {
    "6.1": "linux-image-amd64",
    "6.12": "linux-image-6.12-amd64",
}

# Modules the guest needs; their dependencies are resolved from modules.dep.
GUEST_MODULES = (
    "virtio_pci",  # transport for virtio-9p
    "9pnet_virtio",
    "9p",
    "overlay",  # writable view of the read-only host root
    "fuse",
    "cuse",  # so /dev/cuse exists for the emulator
    "tpm_vtpm_proxy",  # swtpm --vtpm-proxy -> real kernel /dev/tpmrm0
)

_QEMU = "qemu-system-x86_64"
_MEMORY_MB = 1024
_SMP = 2
_MSIZE = 512000  # virtio transport maximum
_CONSOLE_TAIL = 4000
_SENTINEL = "CUSETPM-RIG"


class RigError(RuntimeError):
    """The rig could not produce a genuine result (boot failure, timeout...)."""


@dataclass(frozen=True)
class KernelFiles:
    """An extracted Debian kernel package in the cache."""

    version: str  # series as in KERNELS, e.g. "6.12"
    package: str  # concrete package, e.g. "linux-image-6.12.117+deb12-amd64"
    package_version: str  # Debian version of that package
    release: str  # uname -r, e.g. "6.12.117+deb12-amd64"
    root: Path  # extraction root
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release>


@dataclass
class GuestResult:
    """Outcome of one command run inside a booted guest."""

    returncode: int  # exit status of the command inside the guest
    output: str  # its stdout+stderr
    console: str  # full serial console log, for debugging failures
    seconds: float  # wall time from qemu start to qemu exit


# --------------------------------------------------------------------------
# kernel cache


def cache_dir() -> Path:
    """Where kernels are cached; env CUSETPM_RIG_CACHE overrides the default."""
    env = os.environ.get("CUSETPM_RIG_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cusetpm" / "kernels"


def _which(name: str) -> str:
    """Find a tool, also in sbin dirs that a non-root PATH may lack."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    found = shutil.which(name, path=path)
    if not found:
        raise RigError(f"rig: required tool {name!r} not found (see cusetpm.rig docstring for packages)")
    return found


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    """Run a host tool, raising RigError with its stderr on failure."""
    try:
        return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)
    except subprocess.CalledProcessError as exc:
        raise RigError(f"rig: {' '.join(argv)} failed ({exc.returncode}):\n{exc.stderr.strip()}") from exc


_apt_updated = False


def _apt_resolve(meta: str) -> tuple[str, str] | None:
    """Map a meta package to (concrete package, version), or None if apt can't."""
    env = dict(os.environ, LC_ALL="C")
    dep = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", meta],
        text=True, capture_output=True, env=env,
    )
    pkg = None
    for line in dep.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and not m.group(1).startswith("<"):
            pkg = m.group(1)
            break
    if dep.returncode != 0 or pkg is None:
        return None
    show = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", pkg], text=True, capture_output=True, env=env
    )
    m = re.search(r"^Version:\s*(\S+)", show.stdout, re.M)
    if show.returncode != 0 or not m:
        return None
    return pkg, m.group(1)


def _resolve_package(version: str) -> tuple[str, str] | None:
    """Resolve via apt, running `apt-get update` once if apt knows nothing."""
    global _apt_updated
    meta = _META_PACKAGES[version]
    if shutil.which("apt-cache") is None:
        return None
    got = _apt_resolve(meta)
    if got is None and not _apt_updated and os.geteuid() == 0:
        _apt_updated = True
        subprocess.run(["apt-get", "update"], capture_output=True)
        got = _apt_resolve(meta)
    return got


def _kernel_from_dir(version: str, root: Path) -> KernelFiles:
    """Describe an extracted package directory, validating its contents."""
    stampfile = root / ".cusetpm-rig-stamp"
    stamp = dict(
        line.split("=", 1) for line in stampfile.read_text().splitlines() if "=" in line
    )
    mods = [p for base in ("lib/modules", "usr/lib/modules") for p in sorted((root / base).glob("*")) if p.is_dir()]
    if len(mods) != 1:
        raise RigError(f"rig: expected one modules dir in {root}, found {mods}")
    release = mods[0].name
    vmlinuz = None
    for base in ("boot", "usr/lib/linux", "usr/boot"):
        cand = root / base / f"vmlinuz-{release}"
        if cand.exists():
            vmlinuz = cand
            break
    if vmlinuz is None:
        raise RigError(f"rig: no vmlinuz-{release} in {root}")
    return KernelFiles(
        version=version,
        package=stamp.get("package", "?"),
        package_version=stamp.get("package_version", "?"),
        release=release,
        root=root,
        vmlinuz=vmlinuz,
        modules_dir=mods[0],
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise cache writers (parallel test workers share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_candidates(version: str) -> list[Path]:
    """Already extracted kernels of a series, newest first (for offline use)."""
    out = []
    base = cache_dir()
    if base.is_dir():
        for d in base.iterdir():
            st = d / ".cusetpm-rig-stamp"
            if st.is_file() and f"series={version}\n" in st.read_text():
                out.append(d)
    return sorted(out, key=lambda p: p.stat().st_mtime, reverse=True)


@functools.lru_cache(maxsize=None)
def ensure_kernel(version: str) -> KernelFiles:
    """Download and extract Debian's kernel for a series (cached), return its paths.

    The concrete package is resolved from the meta package with apt-cache each
    process, so a kernel security update is picked up automatically; without
    apt data the newest cached extraction of that series is used.
    """
    if version not in _META_PACKAGES:
        raise RigError(f"rig: unknown kernel series {version!r}; known: {KERNELS}")
    resolved = _resolve_package(version)
    if resolved is None:
        cands = _cached_candidates(version)
        if cands:
            return _kernel_from_dir(version, cands[0])
        raise RigError(
            f"rig: apt cannot resolve {_META_PACKAGES[version]} and nothing is cached in "
            f"{cache_dir()} (run 'apt-get update' as root?)"
        )
    pkg, pkgver = resolved
    base = cache_dir()
    dest = base / f"{pkg}_{pkgver.replace(':', '%3a')}"
    stampfile = dest / ".cusetpm-rig-stamp"
    with _locked(base / ".lock"):
        if not stampfile.is_file():
            _download_and_extract(version, pkg, pkgver, dest)
    kernel = _kernel_from_dir(version, dest)
    if not kernel.release.startswith(version + "."):
        raise RigError(f"rig: {pkg} is release {kernel.release}, not series {version}")
    return kernel


def _download_and_extract(version: str, pkg: str, pkgver: str, dest: Path) -> None:
    """apt-get download + dpkg -x + depmod into dest, atomically (rename)."""
    base = dest.parent
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=base))
    try:
        dl = tmp / "dl"
        dl.mkdir()
        dl.chmod(0o755)  # let apt's _apt sandbox user write here
        tmp.chmod(0o755)
        _run(["apt-get", "download", f"{pkg}={pkgver}"], cwd=dl)
        debs = list(dl.glob("*.deb"))
        if len(debs) != 1:
            raise RigError(f"rig: apt-get download {pkg} produced {debs}")
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        shutil.rmtree(dl)
        (root / ".cusetpm-rig-stamp").write_text("")
        kernel = _kernel_from_dir(version, root)
        if not (kernel.modules_dir / "modules.dep").is_file():
            # Debian generates modules.dep in postinst, so the .deb lacks it.
            depmod_base = kernel.modules_dir.parents[2]  # dir holding lib/modules
            _run([_which("depmod"), "-b", str(depmod_base), kernel.release])
        (root / ".cusetpm-rig-stamp").write_text(
            f"series={version}\npackage={pkg}\npackage_version={pkgver}\n"
        )
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# initramfs


def _modname(path: str) -> str:
    name = os.path.basename(path)
    name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", name)
    return name.replace("-", "_")


def module_load_order(kernel: KernelFiles, wanted: Iterable[str] = GUEST_MODULES) -> list[str]:
    """Module files (relative to modules_dir) to insmod, dependencies first.

    Computed from modules.dep because 6.1 and 6.12 differ (and some modules
    may be built in, per modules.builtin, in which case they are skipped).
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[_modname(path)] = (path.strip(), rest.split())
    builtin = set()
    bfile = kernel.modules_dir / "modules.builtin"
    if bfile.is_file():
        builtin = {_modname(line) for line in bfile.read_text().split()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in deps:
            if name in builtin:
                return
            raise RigError(f"rig: module {name} (needed by {' <- '.join(chain) or 'rig'}) "
                           f"is neither in modules.dep nor built into {kernel.release}")
        seen.add(name)
        path, needs = deps[name]
        for dep in needs:
            visit(_modname(dep), chain + (name,))
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed (busybox insmod can't read .ko.xz/.zst)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run([_which("zstd"), "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def _busybox() -> Path:
    """The static busybox (a dynamic one would not run inside the initramfs)."""
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file() and _is_static_elf(p):
            return p
    found = shutil.which("busybox")
    if found and _is_static_elf(Path(found)):
        return Path(found)
    raise RigError("rig: a statically linked busybox is required (Debian package busybox-static)")


def _is_static_elf(path: Path) -> bool:
    """True if an ELF64 file has no PT_INTERP (i.e. needs no dynamic loader)."""
    with open(path, "rb") as fh:
        hdr = fh.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff = int.from_bytes(hdr[32:40], "little")
        phentsize = int.from_bytes(hdr[54:56], "little")
        phnum = int.from_bytes(hdr[56:58], "little")
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    return all(
        int.from_bytes(table[i * phentsize:i * phentsize + 4], "little") != 3 for i in range(phnum)
    )


class _Cpio:
    """Minimal newc writer: lets us add /dev/console without being root."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + nameb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# The init runs from the initramfs with busybox; everything host-specific
# (share mounts, the command) arrives through the rigctl 9p share.
_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /ctl /lower /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "@SENT@-FAIL: $*"; sync; poweroff -f; sleep 60; }
while read -r m; do insmod "/modules/$m" || fail "insmod $m"; done < /modules.list
O9P="trans=virtio,version=9p2000.L,msize=@MSIZE@"
mount -t 9p -o "$O9P,cache=none" rigctl /ctl || fail "mount rigctl"
mount -t 9p -o "$O9P,ro,cache=loose" hostroot /lower || fail "mount hostroot"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "mount overlay"
mount -t proc proc /newroot/proc || fail "mount proc"
mount -t sysfs sysfs /newroot/sys || fail "mount sys"
mount -t devtmpfs devtmpfs /newroot/dev || fail "mount dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm || fail "mount shm"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "mount run"
ip link set lo up || fail "lo up"
. /ctl/setup.sh
cp /ctl/cmd.sh /newroot/run/cusetpm-rig-cmd.sh || fail "copy cmd"
echo "@SENT@-BEGIN $RIG_NONCE"
if [ "$RIG_INTERACTIVE" = 1 ]; then
  setsid cttyhack chroot /newroot /bin/sh /run/cusetpm-rig-cmd.sh
  rc=$?
else
  chroot /newroot /bin/sh /run/cusetpm-rig-cmd.sh </dev/null >/ctl/output 2>&1
  rc=$?
fi
echo "$RIG_NONCE $rc" > /ctl/rc.tmp && mv /ctl/rc.tmp /ctl/rc
echo "@SENT@-END $RIG_NONCE rc=$rc"
sync
poweroff -f
sleep 60
"""


def build_initramfs(kernel: KernelFiles) -> bytes:
    """A cpio archive with static busybox, the needed modules and our /init."""
    cpio = _Cpio()
    for d in ("bin", "dev", "modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", _busybox().read_bytes(), 0o755)
    names = []
    for rel in module_load_order(kernel):
        name = _modname(rel) + ".ko"
        cpio.file(f"modules/{name}", _read_module(kernel.modules_dir / rel))
        names.append(name)
    cpio.file("modules.list", ("\n".join(names) + "\n").encode())
    init = _INIT.replace("@SENT@", _SENTINEL).replace("@MSIZE@", str(_MSIZE))
    cpio.file("init", init.encode(), 0o755)
    return cpio.finish()


# --------------------------------------------------------------------------
# running


def _guest_script(command: str, env: dict[str, str] | None, cwd: str) -> str:
    """The sh script run in the chroot: base env, caller env, cwd, command."""
    dirs = os.environ.get("PATH", "").split(":")
    dirs += "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".split(":")
    path = ":".join(dict.fromkeys(d for d in dirs if d))
    base = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "dumb")}
    base.update(env or {})
    lines = ["# generated by cusetpm.rig"]
    for key, val in base.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise RigError(f"rig: invalid environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(val)}")
    lines.append(f"cd {shlex.quote(cwd)} 2>/dev/null || cd /")
    lines.append(command)
    return "\n".join(lines) + "\n"


def _tail(text: str, n: int = _CONSOLE_TAIL) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _qemu_argv(kernel: KernelFiles, initrd: Path, ctl: Path, share: str | None,
               console: str, append_extra: str = "") -> list[str]:
    cmdline = (
        "console=ttyS0 loglevel=7 panic=-1 rdinit=/init random.trust_cpu=on "
        "mitigations=off tsc=reliable no_timer_check " + append_extra
    ).strip()
    argv = [
        _which(_QEMU),
        "-accel", "tcg",
        "-machine", "pc",
        "-cpu", "max",
        "-smp", str(_SMP),
        "-m", str(_MEMORY_MB),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initrd),
        "-append", cmdline,
        "-serial", console,
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=rigctl,path={ctl},security_model=none",
        "-device", "virtio-9p-pci,fsdev=rigctl,mount_tag=rigctl",
    ]
    if share is not None:
        argv += [
            "-fsdev", f"local,id=rigshare,path={share},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=rigshare,mount_tag=rigshare",
        ]
    return argv


def _die_with_parent() -> None:
    """preexec: SIGKILL qemu if this process dies abruptly (e.g. SIGTERM to pytest)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen) -> None:
    """Kill qemu (and anything in its process group) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()


def _prepare(tmp: Path, kernel: KernelFiles, command: str, env: dict[str, str] | None,
             share: str | None, interactive: bool) -> tuple[Path, Path, str]:
    """Write the initramfs and the rigctl share contents; returns (initrd, ctl, nonce)."""
    ctl = tmp / "ctl"
    ctl.mkdir()
    initrd = tmp / "initramfs.cpio"
    initrd.write_bytes(build_initramfs(kernel))
    nonce = secrets.token_hex(8)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    (ctl / "cmd.sh").write_text(_guest_script(command, env, cwd))
    setup = [f"RIG_NONCE={nonce}", f"RIG_INTERACTIVE={1 if interactive else 0}"]
    if share is not None:
        q = shlex.quote("/newroot" + share)
        setup.append(f"mkdir -p {q} || fail 'mkdir share'")
        setup.append(f'mount -t 9p -o "$O9P,cache=none" rigshare {q} || fail "mount share"')
    (ctl / "setup.sh").write_text("\n".join(setup) + "\n")
    return initrd, ctl, nonce


def _check_share(share: str | None) -> str | None:
    if share is None:
        return None
    p = Path(share).resolve()
    if not p.is_dir():
        raise RigError(f"rig: share {share!r} is not a directory")
    if p == Path("/") or "," in str(p):
        raise RigError(f"rig: share {share!r} cannot be exported")
    return str(p)


def _reap_stale_tempdirs() -> None:
    """Remove temp dirs of rig runs whose process was killed (no cleanup ran)."""
    for d in Path(tempfile.gettempdir()).glob("cusetpm-rig-*"):
        with contextlib.suppress(OSError, ValueError):
            pid = int((d / "owner.pid").read_text())
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)


def run_in_guest(version: str, command: str, *, timeout: float = 600,
                 env: dict[str, str] | None = None, share: str | None = None) -> GuestResult:
    """Boot kernel `version`, run `command` as root in the chrooted host root.

    cwd is the host's cwd if it exists in the guest, else /; `env` is exported
    on top of PATH (host PATH plus sbin dirs), HOME=/root, LANG=C.UTF-8.
    `share` is a host directory mounted read-write at the same guest path.
    Raises RigError (with the console tail) on boot failure, timeout or a
    missing result; never returns a made-up result.
    """
    kernel = ensure_kernel(version)
    share = _check_share(share)
    _reap_stale_tempdirs()
    with tempfile.TemporaryDirectory(prefix="cusetpm-rig-") as tmpname:
        tmp = Path(tmpname)
        (tmp / "owner.pid").write_text(str(os.getpid()))
        initrd, ctl, nonce = _prepare(tmp, kernel, command, env, share, interactive=False)
        console_path = tmp / "console.log"
        qemu_err = tmp / "qemu.err"
        argv = _qemu_argv(kernel, initrd, ctl, share, f"file:{console_path}")
        start = time.monotonic()
        with open(qemu_err, "w") as errfh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errfh, stderr=errfh,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill(proc)
        seconds = time.monotonic() - start
        console = console_path.read_text(errors="replace") if console_path.exists() else ""
        qerr = qemu_err.read_text(errors="replace").strip()
        where = f"kernel {kernel.release} ({kernel.package} {kernel.package_version})"

        def fail(msg: str) -> RigError:
            extra = f"\n--- qemu stderr ---\n{_tail(qerr)}" if qerr else ""
            return RigError(f"rig: {msg} [{where}, {seconds:.1f}s]{extra}\n"
                            f"--- console tail ---\n{_tail(console)}")

        if timed_out:
            raise fail(f"guest timed out after {timeout}s")
        rcfile = ctl / "rc"
        if not rcfile.is_file():
            m = re.search(rf"{_SENTINEL}-FAIL: (.*)", console)
            why = f"guest init failed: {m.group(1)}" if m else "guest produced no result (no exit-status sentinel)"
            raise fail(f"{why}; qemu exit {proc.returncode}")
        parts = rcfile.read_text().split()
        if len(parts) != 2 or parts[0] != nonce or not parts[1].isdigit():
            raise fail(f"corrupt exit-status sentinel {parts!r}")
        output = (ctl / "output").read_text(errors="replace") if (ctl / "output").exists() else ""
        return GuestResult(returncode=int(parts[1]), output=output, console=console, seconds=seconds)


def run_interactive(version: str, command: str = "exec /bin/bash -i", *,
                    env: dict[str, str] | None = None, share: str | None = None) -> int:
    """Debug aid: boot with the serial console on this terminal (Ctrl-A x quits)."""
    kernel = ensure_kernel(version)
    share = _check_share(share)
    with tempfile.TemporaryDirectory(prefix="cusetpm-rig-") as tmpname:
        tmp = Path(tmpname)
        initrd, ctl, _ = _prepare(tmp, kernel, command, env, share, interactive=True)
        argv = _qemu_argv(kernel, initrd, ctl, share, "mon:stdio")
        proc = subprocess.Popen(argv)
        try:
            proc.wait()
        finally:
            _kill(proc)
        rcfile = ctl / "rc"
        return int(rcfile.read_text().split()[1]) if rcfile.is_file() else 125


# --------------------------------------------------------------------------
# guest-side helpers


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


# --------------------------------------------------------------------------
# command line: python -m cusetpm.rig {fetch,run,shell}


def main(argv: list[str] | None = None) -> int:
    """CLI for prefetching kernels and debugging boots by hand."""
    ap = argparse.ArgumentParser(prog="python -m cusetpm.rig", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download/extract kernels into the cache")
    f.add_argument("versions", nargs="*", default=list(KERNELS))
    r = sub.add_parser("run", help="run a command in a guest, print its output")
    r.add_argument("version", choices=KERNELS)
    r.add_argument("command")
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("--share")
    r.add_argument("--swtpm", action="store_true", help="prefix the swtpm prelude")
    r.add_argument("--console", action="store_true", help="also print the console log")
    s = sub.add_parser("shell", help="interactive shell in a guest (Ctrl-A x quits)")
    s.add_argument("version", choices=KERNELS)
    s.add_argument("--share")
    s.add_argument("--swtpm", action="store_true", help="run the swtpm prelude first")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            for v in args.versions:
                k = ensure_kernel(v)
                print(f"{v}: {k.package} {k.package_version} release={k.release} {k.vmlinuz}")
            return 0
        if args.cmd == "run":
            cmd = (guest_swtpm_prelude() + " && " + args.command) if args.swtpm else args.command
            res = run_in_guest(args.version, cmd, timeout=args.timeout, share=args.share)
            if args.console:
                sys.stderr.write(res.console)
            sys.stdout.write(res.output)
            print(f"[rig: rc={res.returncode} {res.seconds:.1f}s]", file=sys.stderr)
            return res.returncode
        cmd = (guest_swtpm_prelude() + "; exec /bin/bash -i") if args.swtpm else "exec /bin/bash -i"
        return run_interactive(args.version, cmd, share=args.share)
    except RigError as exc:
        print(exc, file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main())
