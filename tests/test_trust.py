"""Trust on the hypervisor: accepting signed indexes and the four pre-boot checks, each attack
refused with its own message and without writing anything to the store."""
from __future__ import annotations

import base64
import json
import os
from datetime import timedelta

import pytest

from cluster.errors import DataError, SpecError
from cluster.store import Store
from catalogue import approvals, hashcache, trust
from catalogue import index as index_module
from catalogue.endorse import add_image, revoke, sign_index
from catalogue.index import Index, new_signature_file, now_utc, parse_index, sign_index_bytes
from catalogue.keys import generate_key, load_private_key
from tests.fixtures.catalogue import PASSPHRASE, make_qcow2, tree_snapshot


def refused(exc_type, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(*args)
    return str(info.value)


def accept_installed_approved(sc):
    return sc.trust_on_site()


def test_trusted_image_passes_all_four_checks(signed_catalogue):
    spec, path = accept_installed_approved(signed_catalogue)
    assert trust.verified_image(spec, "sage").path == path.resolve()
    assert trust.accepted_version(spec) == 1
    assert trust.accepted_index(spec).find("demo", "1").sha256 == hashcache.sha256_file(path)


# --- accepting an index: signature, rollback, freeze, endless data ---------------------------------

def assert_accept_refused(sc, raw: bytes, sig: bytes, *expected: str, exc=DataError) -> str:
    spec = sc.spec()
    before = tree_snapshot(sc.store)
    msg = refused(exc, trust.accept_index, spec, raw, sig)
    for text in expected:
        assert text in msg, msg
    assert tree_snapshot(sc.store) == before, "a refused index must leave the store untouched"
    return msg


def test_forged_signature_refused(signed_catalogue):
    raw, sig = signed_catalogue.signed()
    kind, kid, b64 = sig.decode().splitlines()[1].split()
    forged = bytearray(base64.b64decode(b64))
    forged[10] ^= 0x01
    bad = new_signature_file([f"{kind} {kid} {base64.b64encode(bytes(forged)).decode()}\n"])
    assert_accept_refused(signed_catalogue, raw, bad, "forged or mismatched signature", kid)


def test_tampered_index_byte_refused_by_signature(signed_catalogue):
    raw, sig = signed_catalogue.signed()
    tampered = raw.replace(b"roles: [sage]", b"roles: [hub]")
    assert tampered != raw
    assert_accept_refused(signed_catalogue, tampered, sig, "forged or mismatched signature")


def test_wrong_key_refused(signed_catalogue, tmp_path):
    other = tmp_path / "other.key"
    generate_key(other, PASSPHRASE.encode())
    raw, _ = signed_catalogue.signed()
    sig = new_signature_file([sign_index_bytes(raw, load_private_key(other, PASSPHRASE.encode()))])
    assert_accept_refused(signed_catalogue, raw, sig, "signed only by untrusted key(s)")


def test_truncated_signature_refused(signed_catalogue):
    raw, sig = signed_catalogue.signed()
    line = sig.decode().splitlines()[1]
    short = new_signature_file([line[:-4] + "\n"])  # still valid base64, 63 bytes
    assert_accept_refused(signed_catalogue, raw, short, "signature is 63 bytes, expected 64", "truncated")
    assert_accept_refused(signed_catalogue, raw, sig[:-20], "not valid base64", "truncated")
    assert_accept_refused(signed_catalogue, raw, sig[:20], "no signature lines")


def test_rollback_to_older_signed_index_refused(signed_catalogue):
    sc = signed_catalogue
    v1 = sc.signed()
    sc.sign()  # version 2, same entries
    spec = sc.spec()
    assert trust.accept_index(spec, *sc.signed()).version == 2
    assert_accept_refused(sc, *v1, "version 1 is older than the accepted version 2", "rollback")
    assert trust.accepted_version(spec) == 2


def test_same_version_with_other_bytes_refused(signed_catalogue):
    sc = signed_catalogue
    spec = sc.spec()
    trust.accept_index(spec, *sc.signed())
    index = sc.cat.signed_index_unverified()
    index.entries[0].roles = ["sage", "hub"]
    raw = index.render()
    sig = new_signature_file([sign_index_bytes(raw, sc.key())])
    assert_accept_refused(sc, raw, sig, "version 1 was already accepted with different content")


def test_expired_index_refused(signed_catalogue):
    sc = signed_catalogue
    index = sc.cat.signed_index_unverified()
    index.version, index.issued, index.expires = 5, now_utc() - timedelta(days=10), now_utc() - timedelta(days=1)
    raw = index.render()
    sig = new_signature_file([sign_index_bytes(raw, sc.key())])
    assert_accept_refused(sc, raw, sig, "version 5 expired at", "stale index")


def test_oversized_index_refused_before_reading(signed_catalogue):
    sc = signed_catalogue
    sc.write_spec(extra="  max_index_bytes: 4096\n")
    raw, sig = sc.signed()
    big = raw + b"#" * 5000 + b"\n"
    sig_big = new_signature_file([sign_index_bytes(big, sc.key())])
    assert_accept_refused(sc, big, sig_big, "exceeds the limit of 4096 bytes", "refused unread")


# Nested aliases: 10^9 strings if anything walked the expansion; the loader refuses the first anchor.
BILLION_LAUGHS = (b"schema: salvus-image-index/1\nversion: 1\nissued: '2026-01-01T00:00:00Z'\n"
                  b"expires: '2099-01-01T00:00:00Z'\nentries:\n"
                  b"- - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                  + b"".join(b"  - &a%d [*a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d]\n"
                             % ((i,) + (i - 1,) * 10) for i in range(1, 9)))


def test_malformed_yaml_refused_even_when_signed(signed_catalogue):
    sc = signed_catalogue
    for raw, expected in ((b"schema: salvus-image-index/1\nentries: [\n  - {name: x\n", "malformed YAML at line"),
                          (b"- just\n- a list\n", "expected a mapping"),
                          (sc.signed()[0].replace(b"size:", b"bytes:"), "entries[0].bytes: unknown key"),
                          (sc.signed()[0] + b"extra: 1\n", "extra: unknown key"),
                          (BILLION_LAUGHS, "line 6, column 5: anchor &a0 refused")):
        sig = new_signature_file([sign_index_bytes(raw, sc.key())])
        assert_accept_refused(sc, raw, sig, expected)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "demo/../../x", ".hidden"])
def test_index_entry_escaping_the_store_refused(signed_catalogue, name):
    sc = signed_catalogue
    raw = sc.signed()[0].replace(b"- name: demo\n", f"- name: '{name}'\n".encode())
    sig = new_signature_file([sign_index_bytes(raw, sc.key())])
    assert_accept_refused(sc, raw, sig, "entries[0].name: expected letters, digits")


def test_torrent_path_escaping_refused(signed_catalogue):
    sc = signed_catalogue
    raw = sc.signed()[0].replace(b"torrent: torrents/demo-1.torrent", b"torrent: ../../../root/x.torrent")
    sig = new_signature_file([sign_index_bytes(raw, sc.key())])
    assert_accept_refused(sc, raw, sig, "entries[0].torrent: expected 'torrents/NAME-VERSION.torrent'")


def test_threshold_needs_distinct_trusted_keys(signed_catalogue, tmp_path):
    sc = signed_catalogue
    second = tmp_path / "keys" / "second.key"
    generate_key(second, PASSPHRASE.encode())
    sc.write_spec(keys=[sc.pub_path, second.with_name("second.key.pub")], threshold=2)
    raw, sig = sc.signed()
    doubled = sig + sig.decode().splitlines()[1].encode() + b"\n"  # the same key twice counts once
    assert_accept_refused(sc, raw, doubled, "1 valid signature(s) from trusted keys, threshold is 2")
    both = doubled + sign_index_bytes(raw, load_private_key(second, PASSPHRASE.encode())).encode()
    assert trust.accept_index(sc.spec(), raw, both).version == 1


def test_no_trust_anchors_is_a_config_error(signed_catalogue):
    sc = signed_catalogue
    sc.spec_path.write_text(f"store: {sc.store}\nroles: {{sage: {{image: demo@1, port: 6000}}}}\n")
    msg = refused(SpecError, trust.verified_image, sc.spec(), "sage")
    assert "catalogue.trust.keys: no endorser keys configured" in msg
    assert not sc.store.exists()


# --- the four pre-boot checks --------------------------------------------------------------------

def assert_boot_refused(sc, spec, check: str, *expected: str) -> None:
    before = tree_snapshot(sc.store)
    msg = refused(DataError, trust.verified_image, spec, "sage")
    assert f"{check} check failed" in msg, msg
    assert msg.startswith(f"image {spec.roles['sage'].image} for role sage: "), msg
    for text in expected:
        assert text in msg, msg
    assert tree_snapshot(sc.store) == before, "a refused image must leave the store untouched"


def test_no_accepted_index_refused(signed_catalogue):
    spec = signed_catalogue.spec()
    assert_boot_refused(signed_catalogue, spec, "index fresh", "accepted no signed index yet")
    assert not signed_catalogue.store.exists()


def test_accepted_index_that_expired_since_refused(signed_catalogue, monkeypatch):
    sc = signed_catalogue
    sc.sign(days=10 / 86400)  # valid for 10 seconds: accepted and booted while fresh, then frozen
    spec, _ = accept_installed_approved(sc)
    trust.verified_image(spec, "sage")
    expires = trust.accepted_index(spec).expires
    assert expires > now_utc()
    # The clock every expiry check reads moves past it, rather than the test waiting it out.
    monkeypatch.setattr(index_module, "now_utc", lambda: expires + timedelta(seconds=1))
    assert_boot_refused(sc, spec, "index fresh", "expired at", "stale index")


def test_accepted_index_no_longer_signed_by_a_trusted_key_refused(signed_catalogue, tmp_path):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    new_key = tmp_path / "keys" / "rotated.key"
    generate_key(new_key, PASSPHRASE.encode())
    sc.write_spec(keys=[new_key.with_name("rotated.key.pub")])  # the old endorser key was withdrawn
    assert_boot_refused(sc, sc.spec(), "index fresh", "signed only by untrusted key(s)")


def test_endorsed_but_unapproved_refused(signed_catalogue):
    sc = signed_catalogue
    spec = sc.spec()
    trust.accept_index(spec, *sc.signed())
    sc.install()
    assert_boot_refused(sc, spec, "approved", "not in the site's approvals", "catalogue approve demo@1")
    approvals.approve(spec, "demo@*")
    assert trust.verified_image(spec, "sage")
    approvals.unapprove(spec, "demo@*")
    assert_boot_refused(sc, spec, "approved")


def test_approved_but_not_endorsed_refused(signed_catalogue):
    sc = signed_catalogue
    sc.write_spec(image="demo@2")
    spec = sc.spec()
    trust.accept_index(spec, *sc.signed())
    approvals.approve(spec, "demo@2")
    sc.install()
    (sc.store / "images" / "base" / "demo-1.qcow2").rename(sc.store / "images" / "base" / "demo-2.qcow2")
    assert_boot_refused(sc, spec, "endorsed", "not in the accepted signed index (version 1)")


def test_endorsed_for_other_roles_refused(signed_catalogue):
    sc = signed_catalogue
    sc.spec_path.write_text(sc.spec_path.read_text().replace("sage: {", "sage: {image: demo@1, port: 1}, hub: {"))
    spec = sc.spec()
    trust.accept_index(spec, *sc.signed())
    approvals.approve(spec, "demo@1")
    sc.install()
    msg = refused(DataError, trust.verified_image, spec, "hub")
    assert "endorsed check failed: endorsed for roles sage, not hub" in msg


def test_revoked_image_refused(signed_catalogue):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    assert trust.verified_image(spec, "sage")
    assert revoke(sc.cat, "demo@1")
    sc.sign()
    trust.accept_index(spec, *sc.signed())
    assert_boot_refused(sc, spec, "endorsed", "revoked by the endorser in index version 2")


def test_tampered_image_byte_refused(signed_catalogue):
    sc = signed_catalogue
    spec, path = accept_installed_approved(sc)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_boot_refused(sc, spec, "hash", "does not match demo@1", "tampered or corrupt")


def test_truncated_image_refused(signed_catalogue):
    sc = signed_catalogue
    spec, path = accept_installed_approved(sc)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    assert_boot_refused(sc, spec, "hash", "bytes, but demo@1 has")


def test_missing_image_refused(signed_catalogue):
    sc = signed_catalogue
    spec, path = accept_installed_approved(sc)
    path.unlink()
    assert_boot_refused(sc, spec, "file", "cannot open")


def test_hash_cache_reused_until_the_file_changes(signed_catalogue, monkeypatch):
    sc = signed_catalogue
    spec, path = accept_installed_approved(sc)
    trust.verified_image(spec, "sage")  # hashes and remembers
    calls = []
    real = hashcache.sha256_fd
    monkeypatch.setattr(hashcache, "sha256_fd", lambda fd: calls.append(fd) or real(fd))
    trust.verified_image(spec, "sage")
    assert calls == [], "an unchanged image must not be re-hashed"
    # Same size, same mtime, one byte changed: ctime moves, so the cache must not vouch for it.
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    assert_boot_refused(sc, spec, "hash", "tampered or corrupt")
    assert len(calls) == 1


def test_insecure_allow_unsigned_skips_checks_with_one_warning(signed_catalogue, caplog):
    sc = signed_catalogue
    sc.spec_path.write_text(f"store: {sc.store}\ncatalogue: {{insecure_allow_unsigned: true}}\n"
                            f"roles: {{sage: {{image: demo@1, port: 6000}}}}\n")
    path = sc.install()
    with caplog.at_level("WARNING"):
        assert trust.verified_image(sc.spec(), "sage").path == path.resolve()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "WITHOUT signature, approval or hash checks" in warnings[0].getMessage()


def test_raw_image_entries_live_under_their_own_file_name(signed_catalogue, tmp_path):
    sc = signed_catalogue
    raw_image = tmp_path / "plain.img"
    raw_image.write_bytes(os.urandom(300_000))
    entry = add_image(sc.cat, raw_image, "plain", "3", ["sage"], [], None)
    assert entry.format == "raw" and entry.file_name == "plain-3.raw"
    sign_index(sc.cat, sc.key(), timedelta(days=1))
    sc.write_spec(image="plain@3")
    spec = sc.spec()
    trust.accept_index(spec, *sc.signed())
    approvals.approve(spec, "plain@3")
    installed = sc.install("plain-3.raw")
    assert trust.verified_image(spec, "sage").path == installed.resolve()


def test_accepted_index_survives_as_exact_bytes(signed_catalogue):
    sc = signed_catalogue
    spec = sc.spec()
    raw, sig = sc.signed()
    trust.accept_index(spec, raw, sig)
    stored = sorted(Store(sc.store).trust.catalogue_dir.glob("index-*.yaml"))
    assert [p.read_bytes() for p in stored] == [raw]
    assert Index is type(trust.accepted_index(spec))
    sc.image.unlink()  # the endorser side is irrelevant to the host once accepted
    make_qcow2(sc.image, 0x11)
    assert trust.accept_index(spec, raw, sig).version == 1  # re-accepting the same bytes is a no-op


def test_parsed_copy_matches_the_signed_bytes_and_damage_falls_back(signed_catalogue, caplog):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    assert trust.accepted_index(spec) == parse_index(sc.signed()[0])
    parsed = next(Store(sc.store).trust.catalogue_dir.glob("index-*.yaml.json"))
    parsed.write_bytes(b"{not json")
    with caplog.at_level("WARNING"):
        assert trust.verified_image(spec, "sage")
    assert "parsing the index again" in caplog.text


def test_a_changed_parsed_copy_cannot_change_a_boot_decision(signed_catalogue, caplog):
    sc = signed_catalogue
    sc.spec_path.write_text(sc.spec_path.read_text().replace("sage: {", "hub: {image: demo@1, port: 1}, sage: {"))
    spec, _ = accept_installed_approved(sc)
    parsed = next(Store(sc.store).trust.catalogue_dir.glob("index-*.yaml.json"))
    # Valid JSON of a valid index, only not what was signed: demo@1 now also serves hub.
    parsed.write_bytes(parsed.read_bytes().replace(b'"roles": ["sage"]', b'"roles": ["sage", "hub"]'))
    with caplog.at_level("WARNING"):
        msg = refused(DataError, trust.verified_image, spec, "hub")
    assert "endorsed check failed: endorsed for roles sage, not hub" in msg
    assert "parsed copy of the accepted index is unusable (changed since it was accepted)" in caplog.text


def test_trust_state_writable_by_others_refuses_the_boot(signed_catalogue):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    trust_dir = Store(sc.store).trust.dir
    os.chmod(trust_dir, 0o777)
    assert_boot_refused(sc, spec, "index fresh", f"{trust_dir}: writable by group or others (mode 0777)")
    os.chmod(trust_dir, 0o755)
    assert trust.verified_image(spec, "sage")


# --- fast-forward: an index signed by a key the site has since removed ----------------------------

def test_accepted_index_from_a_removed_key_stops_being_the_rollback_floor(signed_catalogue, tmp_path, caplog):
    sc = signed_catalogue
    rogue_path = tmp_path / "keys" / "rogue.key"
    generate_key(rogue_path, PASSPHRASE.encode())
    rogue_pub = rogue_path.with_name("rogue.key.pub")
    sc.write_spec(keys=[sc.pub_path, rogue_pub])
    spec = sc.spec()
    # The compromised key signs the highest version there is; the site accepts it while it trusts the key.
    index = sc.cat.signed_index_unverified()
    index.version = 2 ** 62
    raw = index.render()
    trust.accept_index(spec, raw, new_signature_file([sign_index_bytes(raw, load_private_key(rogue_path, PASSPHRASE.encode()))]))
    assert trust.accepted_version(spec) == 2 ** 62
    sc.write_spec()  # the site removes the compromised key
    sc.sign()  # the real endorser's next index: version 2
    spec = sc.spec()
    with caplog.at_level("WARNING"):
        assert trust.accept_index(spec, *sc.signed()).version == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"accepted index version {2 ** 62} no longer verifies under the current trust anchors" in w
               and "signed only by untrusted key(s)" in w and "no longer the rollback floor" in w for w in warnings)
    approvals.approve(spec, "demo@1")
    sc.install()
    assert trust.verified_image(spec, "sage")
    # the new index is the floor again: the version 1 the real key signed earlier is a rollback
    assert_accept_refused(sc, *_resigned(sc, version=1), "older than the accepted version 2")


def _resigned(sc, version: int, **entry_changes) -> tuple[bytes, bytes]:
    """The endorser's signed index with another version (and demo@1's fields changed), signed again."""
    index = sc.cat.signed_index_unverified()
    index.version = version
    for k, v in entry_changes.items():
        setattr(index.entries[0], k, v)
    raw = index.render()
    return raw, new_signature_file([sign_index_bytes(raw, sc.key())])


# --- approvals pin bytes ----------------------------------------------------------------------------

def other_image(sc, tmp_path):
    other = make_qcow2(tmp_path / "other.qcow2", 0x11)
    return hashcache.sha256_file(other), other.stat().st_size, other


def test_approve_pins_the_accepted_bytes(signed_catalogue):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    entry = trust.accepted_index(spec).find("demo", "1")
    pin = approvals.load(spec).pinned["demo@1"]
    assert (pin.sha256, pin.size, pin.format) == (entry.sha256, entry.size, "qcow2")


def test_index_changing_an_accepted_entry_bytes_is_refused(signed_catalogue, tmp_path):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    sha, size, _ = other_image(sc, tmp_path)
    assert_accept_refused(sc, *_resigned(sc, 2, sha256=sha, size=size + 512),
                          "index version 2: demo@1 has another sha256, size than in the accepted version 1",
                          "changed bytes need a new image version")
    assert_accept_refused(sc, *_resigned(sc, 2, format="raw"), "demo@1 has another format")
    assert trust.accept_index(spec, *_resigned(sc, 2, roles=["sage", "hub"])).version == 2  # not bytes


def test_approved_version_with_other_bytes_in_a_later_index_is_not_booted_or_pulled(signed_catalogue, tmp_path):
    from imagedist.sync import select_entries

    sc = signed_catalogue
    spec, installed = accept_installed_approved(sc)
    # Version 2 drops demo@1 (no accepted entry left to compare with); version 3 lists it again
    # with other bytes, and those bytes are what the store holds.
    index = sc.cat.signed_index_unverified()
    index.version, index.entries = 2, []
    raw = index.render()
    trust.accept_index(spec, raw, new_signature_file([sign_index_bytes(raw, sc.key())]))
    sha, size, other = other_image(sc, tmp_path)
    trust.accept_index(spec, *_resigned(sc, 3, sha256=sha, size=size))
    os.chmod(installed, 0o644)
    installed.write_bytes(other.read_bytes())
    assert_boot_refused(sc, spec, "approved", "the index gives demo@1 other bytes than the approval pinned",
                        "unapproves and approves demo@1 again")
    sel = select_entries(spec, trust.accepted_index(spec))
    assert sel.wanted == [] and "other bytes than the approval pinned" in sel.skipped["demo@1"]
    # The admin accepts the new bytes on purpose.
    approvals.unapprove(spec, "demo@1")
    assert "demo@1" not in approvals.load(spec).pinned
    approvals.approve(spec, "demo@1")
    assert trust.verified_image(spec, "sage")


def test_wildcard_approval_pins_each_version_when_first_accepted(signed_catalogue, tmp_path):
    sc = signed_catalogue
    spec = sc.spec()
    approvals.approve(spec, "demo@*")  # nothing accepted yet: nothing to pin
    assert approvals.load(spec).pinned == {}
    trust.accept_index(spec, *sc.signed())
    sc.install()
    assert set(approvals.load(spec).pinned) == {"demo@1"}
    assert trust.verified_image(spec, "sage")
    sha, size, _ = other_image(sc, tmp_path)
    index = sc.cat.signed_index_unverified()
    index.version = 2
    index.entries[0].version, index.entries[0].sha256, index.entries[0].size = "2", sha, size
    index.entries[0].torrent = "torrents/demo-2.torrent"
    raw = index.render()
    trust.accept_index(spec, raw, new_signature_file([sign_index_bytes(raw, sc.key())]))
    assert approvals.load(spec).pinned["demo@2"].sha256 == sha


def test_approval_without_a_pin_is_refused_until_accept_pins_it(signed_catalogue):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    path = approvals.approvals_path(spec)
    path.write_text("approved: [demo@1]\n")  # an approvals file from before pins
    assert_boot_refused(sc, spec, "approved", "no bytes are pinned for it", "catalogue accept")
    trust.accept_index(spec, *sc.signed())  # the same index again: pins what it lists
    assert trust.verified_image(spec, "sage")


def test_pointer_from_before_the_parsed_pin_reparses_and_the_next_accept_adds_the_pin(signed_catalogue, caplog):
    sc = signed_catalogue
    spec, _ = accept_installed_approved(sc)
    pointer = Store(sc.store).trust.catalogue_dir / "accepted.json"
    legacy = {k: v for k, v in json.loads(pointer.read_text()).items() if k != "parsed_sha256"}
    pointer.write_text(json.dumps(legacy))
    parsed = Store(sc.store).trust.catalogue_dir / legacy["parsed"]
    parsed.write_bytes(parsed.read_bytes().replace(b'"roles": ["sage"]', b'"roles": ["hub"]'))
    assert trust.verified_image(spec, "sage")  # the unpinned copy is not read at all
    trust.accept_index(spec, *sc.signed())  # the same index: rewritten with the pin, nothing lost
    now = json.loads(pointer.read_text())
    assert isinstance(now["parsed_sha256"], str) and now["index"] == legacy["index"]
    assert (Store(sc.store).trust.catalogue_dir / now["index"]).read_bytes() == sc.signed()[0]
    assert trust.accepted_index(spec).find("demo", "1").roles == ["sage"]
    with caplog.at_level("WARNING"):
        assert trust.verified_image(spec, "sage")
    assert "parsed copy" not in caplog.text
