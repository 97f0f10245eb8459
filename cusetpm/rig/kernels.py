# SPDX-License-Identifier: GPL-2.0-only
"""The kernel cache: Debian's kernel packages resolved with apt, downloaded and extracted
(no install: ``apt-get download`` + ``dpkg -x``), and the order to load the guest's modules."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .. import progress
from ..kernel.profiles import PROFILES

__all__ = ["KERNELS", "GUEST_MODULES", "RigError", "KernelFiles", "cache_dir", "ensure_kernel", "module_load_order"]

#: The kernel series the rig boots: one per profile cusetpm reproduces.
KERNELS: tuple[str, ...] = tuple(PROFILES)

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


def _apt_resolve(meta: str) -> tuple[str, str, int] | None:
    """Map a meta package to (concrete package, version, size of its .deb), or None if apt can't."""
    env = dict(os.environ, LC_ALL="C")
    dep = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", meta],
        text=True,
        capture_output=True,
        env=env,
    )
    pkg = None
    for line in dep.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and not m.group(1).startswith("<"):
            pkg = m.group(1)
            break
    if dep.returncode != 0 or pkg is None:
        return None
    show = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], text=True, capture_output=True, env=env)
    m = re.search(r"^Version:\s*(\S+)", show.stdout, re.M)
    if show.returncode != 0 or not m:
        return None
    size = re.search(r"^Size:\s*(\d+)", show.stdout, re.M)
    return pkg, m.group(1), int(size.group(1)) if size else 0


def _resolve_package(version: str) -> tuple[str, str, int] | None:
    """Resolve via apt, running `apt-get update` once if apt knows nothing."""
    global _apt_updated
    meta = _META_PACKAGES[version]
    if shutil.which("apt-cache") is None:
        return None
    got = _apt_resolve(meta)
    if got is None and not _apt_updated and os.geteuid() == 0:
        _apt_updated = True
        with progress.stage(f"[{version}] apt-get update"):
            subprocess.run(["apt-get", "update"], capture_output=True)
        got = _apt_resolve(meta)
    return got


def _kernel_from_dir(version: str, root: Path) -> KernelFiles:
    """Describe an extracted package directory, validating its contents."""
    stampfile = root / ".cusetpm-rig-stamp"
    stamp = dict(line.split("=", 1) for line in stampfile.read_text().splitlines() if "=" in line)
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


@functools.cache
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
            kernel = _kernel_from_dir(version, cands[0])
            progress.note(f"[{version}] kernel {kernel.package} {kernel.package_version} (cached; apt cannot resolve)")
            return kernel
        raise RigError(
            f"rig: apt cannot resolve {_META_PACKAGES[version]} and nothing is cached in "
            f"{cache_dir()} (run 'apt-get update' as root?)"
        )
    pkg, pkgver, size = resolved
    base = cache_dir()
    dest = base / f"{pkg}_{pkgver.replace(':', '%3a')}"
    stampfile = dest / ".cusetpm-rig-stamp"
    with _locked(base / ".lock"):
        if stampfile.is_file():
            progress.note(f"[{version}] kernel {pkg} {pkgver} (cached)")
        else:
            _download_and_extract(version, pkg, pkgver, size, dest)
    kernel = _kernel_from_dir(version, dest)
    if not kernel.release.startswith(version + "."):
        raise RigError(f"rig: {pkg} is release {kernel.release}, not series {version}")
    return kernel


def _apt_download(version: str, pkg: str, pkgver: str, size: int, cwd: Path) -> None:
    """``apt-get download`` with a progress bar: apt reports its percentage on APT::Status-Fd
    (``dlstatus:ID:PERCENT:TEXT`` lines), and ``size`` (from apt-cache) makes it bytes."""
    text = f"[{version}] downloading {pkg}"
    sized = f"{text} ({progress.human_size(size)})" if size else text
    with tempfile.TemporaryFile("w+") as out, progress.stage(sized):
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                ["apt-get", "download", "-o", f"APT::Status-Fd={w}", f"{pkg}={pkgver}"],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(w,),
                text=True,
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        with os.fdopen(r) as status:
            for line in status:
                parts = line.split(":", 3)
                if len(parts) == 4 and parts[0] == "dlstatus" and size:
                    with contextlib.suppress(ValueError):
                        progress.bar(min(size, float(parts[2]) * size / 100), size, text)
        if proc.wait() != 0:
            out.seek(0)
            raise RigError(f"rig: apt-get download {pkg}={pkgver} failed ({proc.returncode}):\n{out.read().strip()}")


def _download_and_extract(version: str, pkg: str, pkgver: str, size: int, dest: Path) -> None:
    """apt-get download + dpkg -x + depmod into dest, atomically (rename)."""
    base = dest.parent
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=base))
    try:
        dl = tmp / "dl"
        dl.mkdir()
        dl.chmod(0o755)  # let apt's _apt sandbox user write here
        tmp.chmod(0o755)
        _apt_download(version, pkg, pkgver, size, dl)
        debs = list(dl.glob("*.deb"))
        if len(debs) != 1:
            raise RigError(f"rig: apt-get download {pkg} produced {debs}")
        root = tmp / "root"
        with progress.stage(f"[{version}] extracting {pkg}"):
            _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
            shutil.rmtree(dl)
            (root / ".cusetpm-rig-stamp").write_text("")
            kernel = _kernel_from_dir(version, root)
            if not (kernel.modules_dir / "modules.dep").is_file():
                # Debian generates modules.dep in postinst, so the .deb lacks it.
                depmod_base = kernel.modules_dir.parents[2]  # dir holding lib/modules
                _run([_which("depmod"), "-b", str(depmod_base), kernel.release])
        (root / ".cusetpm-rig-stamp").write_text(f"series={version}\npackage={pkg}\npackage_version={pkgver}\n")
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
            raise RigError(
                f"rig: module {name} (needed by {' <- '.join(chain) or 'rig'}) "
                f"is neither in modules.dep nor built into {kernel.release}"
            )
        seen.add(name)
        path, needs = deps[name]
        for dep in needs:
            visit(_modname(dep), chain + (name,))
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order
