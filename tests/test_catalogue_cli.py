"""`salvus_jobs catalogue ...` as an endorser and a site admin use it: real keys, qemu-img images,
libtorrent metainfo, and the real HTTP origin."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from catalogue.index import parse_index
from cluster.errors import DataError
from cluster.store import Store
from cluster.yamlmodel import load_yaml
from tests.fixtures.catalogue import PASSPHRASE, make_qcow2, tree_snapshot

ENV = {"SALVUS_KEY_PASSPHRASE": PASSPHRASE}


def test_keygen_writes_encrypted_key_and_prints_public(tmp_path, cli):
    out = tmp_path / "k" / "endorser.key"
    r = cli("catalogue", "keygen", "--dir", str(tmp_path), "--out", str(out), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "-----BEGIN PUBLIC KEY-----" in r.stdout and "key id " in r.stdout
    private = out.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in private and PASSPHRASE.encode() not in private
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.with_name("endorser.key.pub").read_text() in r.stdout
    again = cli("catalogue", "keygen", "--out", str(out), env=ENV)
    assert again.returncode != 0 and "already exists; refusing to overwrite" in again.stderr
    assert out.read_bytes() == private


def test_keygen_without_passphrase_source_refused(tmp_path, cli):
    env = {k: v for k, v in os.environ.items() if k != "SALVUS_KEY_PASSPHRASE"}
    r = subprocess.run([str(Path(sys.executable).parent / "salvus_jobs"), "catalogue", "keygen", "--out",
                        str(tmp_path / "k")], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       timeout=60)
    assert r.returncode == 78 and "no passphrase: set $SALVUS_KEY_PASSPHRASE" in r.stderr
    assert not list(tmp_path.iterdir())


def test_sign_with_wrong_passphrase_refused_and_writes_nothing(signed_catalogue, cli):
    sc = signed_catalogue
    before = tree_snapshot(sc.cat.root)
    r = cli("catalogue", "sign", "--dir", str(sc.cat.root), "--key", str(sc.key_path),
            env={"SALVUS_KEY_PASSPHRASE": "not the passphrase"})
    assert r.returncode == 78, r.stderr
    assert r.stderr.strip().endswith("wrong passphrase, or not an encrypted PEM private key")
    assert "not the passphrase" not in r.stderr + r.stdout
    assert tree_snapshot(sc.cat.root) == before


def test_endorser_flow_add_sign_verify_list_revoke(signed_catalogue, cli, tmp_path):
    sc = signed_catalogue
    d = str(sc.cat.root)
    image = make_qcow2(tmp_path / "hub.qcow2", 0x33)
    r = cli("catalogue", "add", "--dir", d, str(image), "--name", "hub-img", "--version", "2.0",
            "--role", "hub", "--target", "hv01", "--target", "hv02")
    assert r.returncode == 0, r.stderr
    assert "added hub-img@2.0" in r.stdout and "qcow2" in r.stdout
    r = cli("catalogue", "sign", "--dir", d, "--key", str(sc.key_path), "--expires", "2d", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "signed index version 2: 2 entries" in r.stdout
    index = parse_index(sc.cat.index_path.read_bytes())
    hub = index.find("hub-img", "2.0")
    assert (hub.roles, hub.targets, hub.format, hub.file_name) == (["hub"], ["hv01", "hv02"], "qcow2",
                                                                   "hub-img-2.0.qcow2")
    assert hub.web_seeds == [sc.url + "images/"]
    assert (index.expires - index.issued).total_seconds() == 2 * 86400

    r = cli("catalogue", "verify", "--dir", d, "--trust", str(sc.pub_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: index version 2, 2 entries" in r.stdout

    r = cli("catalogue", "list", "--dir", d, "--trust", str(sc.pub_path), "--spec", str(sc.spec_path))
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:] if "@" in line.split()[0]}
    assert rows["demo@1"][5:7] == ["yes", "no"] and rows["hub-img@2.0"][4:6] == ["hub", "yes"]
    assert rows["hub-img@2.0"][1:4] == [str(hub.size), str(4 << 20), "qcow2"]  # virtual: from the header

    r = cli("catalogue", "revoke", "--dir", d, "demo@1")
    assert r.returncode == 0 and "revoked demo@1" in r.stdout
    r = cli("catalogue", "list", "--dir", d, "--trust", str(sc.pub_path))
    assert any(line.startswith("demo@1") and "revoking" in line for line in r.stdout.splitlines())
    cli("catalogue", "sign", "--dir", d, "--key", str(sc.key_path), env=ENV)
    r = cli("catalogue", "list", "--dir", d, "--trust", str(sc.pub_path))
    assert any(line.startswith("demo@1") and " revoked " in line for line in r.stdout.splitlines()), r.stdout
    index = parse_index(sc.cat.index_path.read_bytes())
    assert index.version == 3 and index.revoked == ["demo@1"] and index.find("demo", "1") is None


def test_verify_reports_one_line_per_problem(signed_catalogue, cli):
    sc = signed_catalogue
    image = sc.cat.root / "images" / "demo-1.qcow2"
    os.chmod(image, 0o644)
    data = bytearray(image.read_bytes())
    data[100] ^= 0xFF
    image.write_bytes(bytes(data))
    (sc.cat.root / "torrents" / "demo-1.torrent").write_bytes(b"d4:infod4:name1:xee")
    r = cli("catalogue", "verify", "--dir", str(sc.cat.root), "--trust", str(sc.pub_path))
    assert r.returncode == 65
    lines = r.stdout.splitlines()
    assert len(lines) == 2, lines
    assert "sha256 does not match the index" in lines[0]
    assert "demo-1.torrent" in lines[1]
    assert "2 problems" in r.stderr


def test_verify_with_wrong_trust_key(signed_catalogue, cli, tmp_path):
    sc = signed_catalogue
    cli("catalogue", "keygen", "--out", str(tmp_path / "other.key"), env=ENV)
    r = cli("catalogue", "verify", "--dir", str(sc.cat.root), "--trust", str(tmp_path / "other.key.pub"))
    assert r.returncode == 65 and "signed only by untrusted key(s)" in r.stdout


@pytest.mark.parametrize("threshold", ["-1", "0", "x"])
def test_verify_refuses_a_threshold_below_one(signed_catalogue, cli, threshold):
    """A threshold of 0 or less would verify any bytes: the CLI, the library and the spec refuse it."""
    sc = signed_catalogue
    sc.cat.index_path.write_bytes(sc.cat.index_path.read_bytes() + b"# tampered\n")
    r = cli("catalogue", "verify", "--dir", str(sc.cat.root), "--trust", str(sc.pub_path), "--threshold", threshold)
    assert r.returncode == 2 and "--threshold: expected a positive integer" in r.stderr, (r.returncode, r.stderr)
    from catalogue.index import verify_signatures
    from catalogue.keys import load_trust_keys
    from cluster.errors import SpecError
    with pytest.raises(SpecError, match="threshold must be a positive integer"):
        verify_signatures(sc.cat.index_path.read_bytes(), sc.cat.sig_path.read_bytes(),
                          load_trust_keys([str(sc.pub_path)]), -1)
    sc.write_spec(threshold=0)
    r = cli("catalogue", "accept", "--spec", str(sc.spec_path), "--dir", str(sc.cat.root))
    assert r.returncode == 78 and "catalogue.trust.threshold" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/b", ".hidden", ".."])
def test_add_refuses_names_that_escape(signed_catalogue, cli, name):
    sc = signed_catalogue
    before = tree_snapshot(sc.cat.root)
    r = cli("catalogue", "add", "--dir", str(sc.cat.root), str(sc.image), "--name", name, "--version", "1")
    assert r.returncode == 78 and "--name/--version: expected NAME@VERSION" in r.stderr, r.stderr
    assert tree_snapshot(sc.cat.root) == before


def test_add_refuses_backing_files_and_changed_bytes(signed_catalogue, cli, tmp_path):
    sc = signed_catalogue
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(sc.image), "-F", "qcow2", str(overlay)],
                   check=True)
    before = tree_snapshot(sc.cat.root)
    r = cli("catalogue", "add", "--dir", str(sc.cat.root), str(overlay), "--name", "x", "--version", "1")
    assert r.returncode == 65 and "has a backing file" in r.stderr
    other = make_qcow2(tmp_path / "other.qcow2", 0x77)
    r = cli("catalogue", "add", "--dir", str(sc.cat.root), str(other), "--name", "demo", "--version", "1")
    assert r.returncode == 65 and "already in the catalogue with different bytes" in r.stderr
    assert tree_snapshot(sc.cat.root) == before


def test_cosign_reaches_a_threshold_of_two(signed_catalogue, cli, tmp_path):
    sc = signed_catalogue
    second = tmp_path / "keys" / "second.key"
    assert cli("catalogue", "keygen", "--out", str(second), env=ENV).returncode == 0
    sc.write_spec(keys=[sc.pub_path, second.with_name("second.key.pub")], threshold=2)
    d = str(sc.cat.root)
    r = cli("catalogue", "accept", "--spec", str(sc.spec_path), "--dir", d)
    assert r.returncode == 65 and "threshold is 2" in r.stderr
    r = cli("catalogue", "sign", "--dir", d, "--key", str(second), "--cosign", env=ENV)
    assert r.returncode == 0 and "co-signed index version 1" in r.stdout, r.stderr
    assert len([ln for ln in sc.cat.sig_path.read_text().splitlines() if ln.startswith("ed25519")]) == 2
    r = cli("catalogue", "accept", "--spec", str(sc.spec_path), "--dir", d)
    assert r.returncode == 0 and "index version 1" in r.stdout, r.stderr


def test_site_side_approve_unapprove_accept(signed_catalogue, cli):
    sc = signed_catalogue
    spec = ["--spec", str(sc.spec_path)]
    r = cli("catalogue", "approve", *spec, "../x@1")
    assert r.returncode == 78 and "approval '../x@1'" in r.stderr
    r = cli("catalogue", "approve", *spec, "demo@1")
    assert r.returncode == 0 and "approved demo@1" in r.stdout
    approvals_yaml = Store(sc.store).trust.approvals.read_text()
    # Nothing accepted yet: approved, pinned by the first accepted index that lists it.
    assert load_yaml(approvals_yaml, "approvals.yaml", DataError) == {"approved": ["demo@1"], "pinned": {}}
    assert "its bytes are pinned when an accepted index lists it" in r.stderr
    assert not (sc.cat.root / "approvals.yaml").exists()  # approvals live with the site, not the endorser
    r = cli("catalogue", "accept", *spec, "--dir", str(sc.cat.root))
    assert r.returncode == 0 and "accepted (was none)" in r.stdout
    entry = sc.cat.signed_index_unverified().find("demo", "1")
    pinned = load_yaml(Store(sc.store).trust.approvals.read_text(), "approvals.yaml", DataError)["pinned"]
    assert pinned == {"demo@1": {"sha256": entry.sha256, "size": entry.size, "format": "qcow2"}}
    v1 = sc.signed()
    sc.sign()
    assert cli("catalogue", "accept", *spec, "--dir", str(sc.cat.root)).returncode == 0
    sc.cat.index_path.write_bytes(v1[0])
    sc.cat.sig_path.write_bytes(v1[1])
    r = cli("catalogue", "accept", *spec, "--dir", str(sc.cat.root))
    assert r.returncode == 65 and "rollback refused" in r.stderr
    r = cli("catalogue", "unapprove", *spec, "demo@1")
    assert r.returncode == 0 and "unapproved demo@1" in r.stdout
    approvals_yaml = Store(sc.store).trust.approvals.read_text()
    assert load_yaml(approvals_yaml, "approvals.yaml", DataError) == {"approved": [], "pinned": {}}
