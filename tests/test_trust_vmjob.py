"""The real `salvus-vmjob` refuses an untrusted image: exit 65 naming the failed check, no overlay
or config drive in scratch, no status file, no registry, nothing booted."""
from __future__ import annotations

import pytest

from catalogue import approvals, trust
from catalogue.endorse import revoke
from tests.fixtures.catalogue import tree_snapshot


def run_wrapper(sc, cli, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    before = tree_snapshot(sc.store)
    r = cli("--spec", str(sc.spec_path), "--role", "sage", "--service-id", "sage-t1", program="salvus-vmjob",
            env={"TMPDIR": str(scratch), "SALVUS_LOCAL_JOB_ID": "t1"}, timeout=120)
    assert r.returncode == 65, (r.returncode, r.stderr)
    assert list(scratch.iterdir()) == [], "no overlay or config drive may be created"
    assert tree_snapshot(sc.store) == before, "no status file, registry or cache may be written"
    return r.stderr


@pytest.mark.parametrize("attack", ["unapproved", "tampered", "not accepted", "revoked"])
def test_vmjob_refuses_untrusted_image_with_exit_65(signed_catalogue, cli, tmp_path, attack):
    sc = signed_catalogue
    spec = sc.spec()
    expected = {"unapproved": "approved check failed", "tampered": "hash check failed",
                "not accepted": "index fresh check failed", "revoked": "endorsed check failed"}[attack]
    if attack != "not accepted":
        trust.accept_index(spec, *sc.signed())
    if attack != "unapproved":
        approvals.approve(spec, "demo@1")
    image = sc.install()
    if attack == "tampered":
        data = bytearray(image.read_bytes())
        data[4096] ^= 0x01
        image.write_bytes(bytes(data))
    if attack == "revoked":
        revoke(sc.cat, "demo@1")
        sc.sign()
        trust.accept_index(spec, *sc.signed())
    stderr = run_wrapper(sc, cli, tmp_path)
    assert f"salvus-vmjob: image demo@1 for role sage: {expected}" in stderr, stderr


def test_vmjob_gets_past_the_checks_with_a_trusted_image(signed_catalogue, cli, tmp_path):
    """The control: endorsed + approved + intact passes the trust step. The blank test image has
    no OS, so the guest never reports READY; the wrapper gives up after boot_timeout with a
    transient failure (75) - not 65 - and removes its overlay."""
    sc = signed_catalogue
    sc.write_spec(extra="hypervisor: {boot_timeout: 3, libvirt: never}\n")
    sc.trust_on_site()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = cli("--spec", str(sc.spec_path), "--role", "sage", "--service-id", "sage-t2", program="salvus-vmjob",
            env={"TMPDIR": str(scratch), "SALVUS_LOCAL_JOB_ID": "t2"}, timeout=300)
    assert r.returncode == 75 and "check failed" not in r.stderr, r.stderr
    assert "did not become ready" in r.stderr, r.stderr
    assert list(scratch.iterdir()) == []
