# SPDX-License-Identifier: GPL-2.0-only
"""Real clients through the tenant nodes of ``cusetpm serve --config``, unmodified.

* the tpm2-openssl provider (Debian ``tpm2-openssl``): a key made in the TPM, a signature made
  through the provider, verified by plain openssl;
* FAPI (``tss2_*`` of Debian's ``tpm2-tools``, ``libtss2-fapi1``): provision, create a key,
  sign, verify; and what the default tenant policy keeps FAPI from doing;
* a container (bubblewrap, Debian ``bubblewrap``) that sees one tenant's node as its
  /dev/tpmrm0 and nothing of the other tenant's.

Each test gets its own daemon on its own swtpm (the ``tenants`` fixture) and the node's
policy as the test's TOML says.  A missing tool fails the test naming its Debian package
(scripts/install-deps.sh installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TWO_TENANTS, StartTenants
from cusetpm.tenants.policy import DEFAULT_DENY

TIMEOUT = 60

#: An NV index of each tenant's own range.
OWN_NV = {"tenant-a": "0x01500010", "tenant-b": "0x01500110"}

RC_DENY = "0xb0143"  # cusetpm.tenants.policy.RC_DENY, as tpm2-tss prints it (lower-cased here)
RC_NV = "0xb0149"  # cusetpm.tenants.policy.RC_NV


def need(tool: str, package: str) -> str:
    """The path of ``tool``; fails the test naming the Debian package if it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (Debian package {package}; scripts/install-deps.sh installs it)")
    return path


def run(
    argv: list[str], *, env: dict[str, str], cwd: Path, check: bool = True, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a client program; with ``check`` a non-zero exit fails the test with its output."""
    proc = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stdout + proc.stderr).lower()


def toml_list(items: list[str]) -> str:
    """A TOML array of strings (JSON's spelling is TOML's)."""
    return json.dumps(items)


def deny_without(*allowed: str) -> list[str]:
    """The default deny list less ``allowed`` (the same list once the default no longer has
    them)."""
    return [name for name in DEFAULT_DENY if name not in allowed]


# --- tpm2-openssl ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm, pkeyopt, size",
    [("EC", "group:P-256", 256), ("RSA", "bits:2048", 2048)],
    ids=["ec-p256", "rsa-2048"],
)
def test_openssl_provider_signs_through_a_tenant_node(
    tenants: StartTenants, tmp_path: Path, algorithm: str, pkeyopt: str, size: int
) -> None:
    """A key generated in the TPM through tenant-a's node (default policy), a file signed with
    it through the provider, and the signature verified by plain openssl with the public key
    the provider exported."""
    openssl = need("openssl", "openssl")
    t = tenants(TWO_TENANTS)
    node = t.nodes["tenant-a"]
    work = tmp_path / "openssl"
    work.mkdir()
    tpm_env = dict(os.environ, TPM2OPENSSL_TCTI=f"device:{node}")
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("TPM2")}
    provider = ["-provider", "tpm2", "-provider", "default"]

    probe = run([openssl, "list", "-providers", "-provider", "tpm2"], env=tpm_env, cwd=work, check=False)
    if probe.returncode != 0 or "tpm2" not in probe.stdout.lower():
        pytest.fail(f"openssl has no tpm2 provider (Debian package tpm2-openssl):\n{probe.stdout}\n{probe.stderr}")

    run([openssl, "genpkey", *provider, "-algorithm", algorithm, "-pkeyopt", pkeyopt, "-out", "key.pem"],
        env=tpm_env, cwd=work)  # fmt: skip
    key = (work / "key.pem").read_text()
    # The private part is a TPM-wrapped blob: only the TPM (through the provider) can use it.
    assert key.startswith("-----BEGIN TSS2 PRIVATE KEY-----"), key
    plain_load = run([openssl, "pkey", "-in", "key.pem", "-noout"], env=plain_env, cwd=work, check=False)
    assert plain_load.returncode != 0, "plain openssl loaded the TPM key as a software key"

    (work / "msg").write_bytes(b"signed through a cusetpm tenant node\n" * 10)
    run([openssl, "pkeyutl", *provider, "-sign", "-inkey", "key.pem", "-rawin", "-digest", "sha256",
         "-in", "msg", "-out", "msg.sig"], env=tpm_env, cwd=work)  # fmt: skip
    run([openssl, "pkey", *provider, "-in", "key.pem", "-pubout", "-out", "pub.pem"], env=tpm_env, cwd=work)
    public = run([openssl, "pkey", "-pubin", "-in", "pub.pem", "-noout", "-text"], env=plain_env, cwd=work)
    assert f"Public-Key: ({size} bit)" in public.stdout, public.stdout

    verify = run([openssl, "dgst", "-sha256", "-verify", "pub.pem", "-signature", "msg.sig", "msg"],
                 env=plain_env, cwd=work, check=False)  # fmt: skip
    assert verify.returncode == 0 and "verified ok" in verify.stdout.lower(), output(verify)

    # The same check on a changed message must fail, or the check above proves nothing.
    (work / "msg").write_bytes(b"not what was signed\n")
    forged = run([openssl, "dgst", "-sha256", "-verify", "pub.pem", "-signature", "msg.sig", "msg"],
                 env=plain_env, cwd=work, check=False)  # fmt: skip
    assert forged.returncode != 0 and "verification failure" in output(forged), output(forged)


# --- FAPI ------------------------------------------------------------------------------------

#: FAPI on a tenant node needs nothing beyond the default policy (its TPM2_Startup(CLEAR) gets
#: the TPM's TPM_RC_INITIALIZE, as through the kernel), except for provisioning:
#: Fapi_Provision always sets the dictionary-attack parameters (DictionaryAttackParameters,
#: authorized by the lockout hierarchy), which is TPM-wide: only the operator's ``fapi-admin``
#: node may, and the tenant is shown to be refused it.
FAPI_NODES = f"""
[[node]]
name = "fapi-admin"
deny = {toml_list(deny_without("DictionaryAttackParameters"))}
hierarchies = ["owner", "endorsement", "lockout"]

[[node]]
name = "fapi-tenant"
nv = ["0x01500000-0x015000ff"]
persistent = ["0x81000100-0x810001ff"]
"""


def fapi_config(base: Path, node: Path, profile_dir: Path) -> Path:
    """A FAPI config (what TSS2_FAPICONF names) with its keystore under ``base``."""
    for sub in ("user", "system", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    conf = base / f"fapi-{node.name}.json"
    conf.write_text(json.dumps({
        "profile_name": "P_ECCP256SHA256",
        "profile_dir": f"{profile_dir}/",
        "user_dir": str(base / "user"),
        "system_dir": str(base / "system"),
        "log_dir": str(base / "log"),
        "tcti": f"device:{node}",
        "system_pcrs": [],
        "ek_cert_less": "yes",
    }, indent=2))  # fmt: skip
    return conf


def fapi_profile(dest: Path) -> Path:
    """Debian's P_ECCP256SHA256 profile with a transient SRK.

    The shipped profile makes the SRK persistent at 0x81000001 (its ``srk_template``), and
    every later FAPI call uses that handle; a tenant's ``persistent`` range guards using a
    handle as well as EvictControl, so every tenant would need 0x81000001 in its range, and
    could then evict the SRK all tenants share.  Without the handle, FAPI recreates the SRK
    from the template (CreatePrimary) whenever it needs it."""
    shipped = Path("/etc/tpm2-tss/fapi-profiles/P_ECCP256SHA256.json")
    if not shipped.is_file():
        pytest.fail(f"{shipped} is missing (Debian package libtss2-fapi1)")
    text = shipped.read_text()
    persistent_srk = '"system,restricted,decrypt,0x81000001"'
    assert persistent_srk in text, f"{shipped}'s srk_template changed; revisit this test:\n{text}"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / shipped.name).write_text(text.replace(persistent_srk, '"system,restricted,decrypt"'))
    return dest


def test_fapi_through_tenant_nodes(tenants: StartTenants, tmp_path: Path) -> None:
    """The operator provisions FAPI through its admin node; the tenant, through its own node,
    creates a signing key, signs a digest and verifies the signature (by FAPI and by plain
    openssl); provisioning from the tenant node is refused."""
    tools = {name: need(name, "tpm2-tools") for name in ("tss2_provision", "tss2_createkey", "tss2_sign",
                                                          "tss2_verifysignature")}  # fmt: skip
    openssl = need("openssl", "openssl")
    t = tenants(FAPI_NODES)
    profiles = fapi_profile(tmp_path / "fapi-profiles")
    keystore = tmp_path / "fapi"
    admin = dict(os.environ, TSS2_FAPICONF=str(fapi_config(keystore, t.nodes["fapi-admin"], profiles)))
    tenant = dict(os.environ, TSS2_FAPICONF=str(fapi_config(keystore, t.nodes["fapi-tenant"], profiles)))

    # Provisioning sets TPM-wide DA parameters: the tenant node refuses it (its own keystore,
    # so the failed attempt leaves nothing behind for the real one).
    # ESAPI's error lines name the refused command; TSS2_LOG may have been silenced in this
    # process (cusetpm.backends.tcti does so for its own TCTI), so ask for them.
    tried = dict(os.environ, TSS2_FAPICONF=str(fapi_config(tmp_path / "fapi-tried", t.nodes["fapi-tenant"], profiles)),
                 TSS2_LOG="all+ERROR")  # fmt: skip
    refused = run([tools["tss2_provision"]], env=tried, cwd=tmp_path, check=False)
    assert refused.returncode != 0, f"tss2_provision passed through the tenant node:\n{output(refused)}"
    assert RC_DENY in output(refused) and "dictionaryattackparameters" in output(refused), output(refused)

    run([tools["tss2_provision"]], env=admin, cwd=tmp_path)

    run([tools["tss2_createkey"], "--path", "HS/SRK/mykey", "--type", "sign", "--authValue", ""],
        env=tenant, cwd=tmp_path)  # fmt: skip
    digest = tmp_path / "digest"
    digest.write_bytes(bytes(range(32)))  # a SHA-256 digest's size
    run([tools["tss2_sign"], "--keyPath", "HS/SRK/mykey", "--digest", str(digest), "--signature",
         str(tmp_path / "sig.der"), "--publicKey", str(tmp_path / "pub.pem")], env=tenant, cwd=tmp_path)  # fmt: skip
    verify = [tools["tss2_verifysignature"], "--keyPath", "HS/SRK/mykey", "--digest", str(digest),
              "--signature", str(tmp_path / "sig.der")]  # fmt: skip
    run(verify, env=tenant, cwd=tmp_path)
    plain = run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-in", str(digest),
                 "-sigfile", str(tmp_path / "sig.der")], env=tenant, cwd=tmp_path, check=False)  # fmt: skip
    assert plain.returncode == 0 and "verified successfully" in output(plain), output(plain)

    # Another digest: both verifications must now fail, or the ones above prove nothing.
    digest.write_bytes(bytes(range(1, 33)))
    forged = run(verify, env=tenant, cwd=tmp_path, check=False)
    assert forged.returncode != 0 and "signature verification failed" in output(forged), output(forged)
    plain = run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-in", str(digest),
                 "-sigfile", str(tmp_path / "sig.der")], env=tenant, cwd=tmp_path, check=False)  # fmt: skip
    assert plain.returncode != 0, output(plain)


# --- containers: bubblewrap ------------------------------------------------------------------


def sandboxed(node: Path, hide: Path, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``sh -c SCRIPT`` in a bubblewrap container whose /dev/tpmrm0 is ``node`` (bound in, as
    ``podman -v NODE:/dev/tpmrm0`` would), with every namespace unshared, a fresh /proc, an
    empty /tmp, ``hide`` (the FUSE directory's parent) covered by an empty tmpfs and only PATH
    and TPM2TOOLS_TCTI in the environment."""
    bwrap = need("bwrap", "bubblewrap")
    argv = [
        bwrap, "--unshare-all", "--die-with-parent", "--new-session",
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", str(hide),
        "--bind", str(node), "/dev/tpmrm0",
        "--clearenv", "--setenv", "PATH", "/usr/sbin:/usr/bin:/sbin:/bin",
        "--setenv", "TPM2TOOLS_TCTI", "device:/dev/tpmrm0", "--chdir", "/tmp",
        "sh", "-c", script,
    ]  # fmt: skip
    return run(argv, env=dict(os.environ), cwd=cwd, check=False)


@pytest.mark.parametrize("name, other", [("tenant-a", "tenant-b"), ("tenant-b", "tenant-a")])
def test_bubblewrap_container_sees_only_its_tenant_node(
    tenants: StartTenants, tmp_path: Path, name: str, other: str
) -> None:
    """Unmodified tpm2-tools in a container work on the tenant's node as /dev/tpmrm0; the other
    tenant's node is not there; the node's policy answers inside as outside."""
    need("tpm2_getrandom", "tpm2-tools")
    t = tenants(TWO_TENANTS)
    node, other_node = t.nodes[name], t.nodes[other]
    hide = t.daemon.mount.parent
    assert other_node.exists() and node.exists()

    inside = sandboxed(node, hide, f"""
        set -e
        test -e /dev/tpmrm0
        ls -A /dev
        if test -e '{other_node}'; then echo "OTHER VISIBLE"; exit 3; fi
        if test -e '{t.daemon.mount}'; then echo "FUSE DIR VISIBLE"; exit 4; fi
        ls -A '{hide}'
        tpm2_createprimary -C o -G ecc -c primary.ctx -Q
        tpm2_readpublic -c primary.ctx -Q
        echo "RANDOM $(tpm2_getrandom 8 --hex)"
    """, tmp_path)  # fmt: skip
    assert inside.returncode == 0, f"bwrap or the tools inside failed ({inside.returncode}):\n{output(inside)}"
    lines = inside.stdout.split()
    assert "tpmrm0" in lines, inside.stdout
    assert other not in inside.stdout and "mnt" not in lines, inside.stdout  # nothing of the FUSE dir
    random = next(line for line in inside.stdout.splitlines() if line.startswith("RANDOM "))
    assert len(random.split()[1]) == 16 and int(random.split()[1], 16) >= 0, random

    # The other tenant's node, by the path it has outside: not there.
    reach = sandboxed(node, hide, f"tpm2_getrandom -T 'device:{other_node}' 8 --hex", tmp_path)
    assert reach.returncode != 0, f"the other tenant's node answered inside:\n{output(reach)}"
    assert "no such file or directory" in output(reach), output(reach)

    # A refusal inside is the resource manager's, as outside.
    clear = sandboxed(node, hide, "tpm2_clear", tmp_path)
    assert clear.returncode != 0 and RC_DENY in output(clear), output(clear)

    # /dev/tpmrm0 inside is this tenant's node: its NV range, not the other's.
    own, theirs = OWN_NV[name], OWN_NV[other]
    nv = sandboxed(node, hide, f"tpm2_nvdefine {own} -C o -s 8 && tpm2_nvundefine {own} -C o", tmp_path)
    assert nv.returncode == 0, output(nv)
    nv = sandboxed(node, hide, f"tpm2_nvdefine {theirs} -C o -s 8", tmp_path)
    assert nv.returncode != 0 and RC_NV in output(nv), output(nv)
