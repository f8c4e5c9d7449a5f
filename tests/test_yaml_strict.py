"""One YAML loader and one validation style: every YAML file the project reads refuses a key given
twice (one line naming the file and the line), and names, versions, image refs and service ids are
matched whole (a trailing newline is not part of a valid name)."""
from __future__ import annotations

import pytest

from cluster.errors import DataError, SpecError
from cluster.spec import load_spec, split_image_ref
from cluster.yamlmodel import is_name, is_service_id, load_yaml
from catalogue import approvals, trust
from catalogue.endorse import CatalogueDir, add_image
from catalogue.index import SCHEMA, Index, new_signature_file, parse_index, sign_index_bytes
from jobwrappers.jobenv import check_service_id
from tests.fixtures.catalogue import tree_snapshot


def one_line(msg: str, *parts: str) -> None:
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


def refused(exc_type, fn, *args) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args)
    return str(info.value)


# --- duplicate keys -------------------------------------------------------------------------------

def test_spec_refuses_a_key_repeated_inside_a_role(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("roles:\n  sage:\n    image: demo@1\n    port: 6000\n    port: 7000\n")
    msg = refused(SpecError, load_spec, path)
    one_line(msg, str(path), "line 5, column 5", "key 'port' appears twice in one mapping")


def test_signed_index_refuses_a_duplicate_key_and_stores_nothing(signed_catalogue):
    """The signature is valid: the endorser signed these bytes. Last-one-wins would let two parsers
    disagree on which sha256 was endorsed, so the index is refused whoever signed it."""
    sc = signed_catalogue
    raw = sc.signed()[0]
    line = raw.decode().splitlines().index(next(ln for ln in raw.decode().splitlines() if "sha256:" in ln)) + 1
    doubled = raw.replace(b"  sha256: ", b"  sha256: " + b"0" * 64 + b"\n  sha256: ", 1)
    sig = new_signature_file([sign_index_bytes(doubled, sc.key())])
    spec = sc.spec()
    before = tree_snapshot(sc.store)
    msg = refused(DataError, trust.accept_index, spec, doubled, sig)
    one_line(msg, "index.yaml", f"line {line + 1}, column 3", "key 'sha256' appears twice")
    assert tree_snapshot(sc.store) == before
    assert trust.accepted_version(spec) == 0


def test_approvals_refuse_a_duplicate_key(signed_catalogue, cli):
    sc = signed_catalogue
    spec = sc.spec()
    path = approvals.approvals_path(spec)
    path.parent.mkdir(parents=True)
    path.write_text("approved: [demo@1]\napproved: []\n")
    one_line(refused(DataError, approvals.load_approvals, spec), str(path), "line 2, column 1",
             "key 'approved' appears twice")
    r = cli("catalogue", "approve", "--spec", str(sc.spec_path), "demo@2")
    assert r.returncode == 65, r.stderr
    assert r.stderr.count("\n") == 1 and "key 'approved' appears twice" in r.stderr and "Traceback" not in r.stderr
    assert path.read_text() == "approved: [demo@1]\napproved: []\n"


def test_catalogue_yaml_and_draft_refuse_a_duplicate_key(signed_catalogue):
    cat: CatalogueDir = signed_catalogue.cat
    cat.config_path.write_text("url: http://a:1/\nlast_version: 1\nurl: http://b:1/\n")
    one_line(refused(DataError, cat.config), str(cat.config_path), "line 3, column 1", "key 'url' appears twice")
    draft = cat.draft_path.read_text()
    cat.draft_path.write_text(draft + "revoked: []\n")
    msg = refused(DataError, cat.draft)
    one_line(msg, str(cat.draft_path), f"line {len(draft.splitlines()) + 1}, column 1", "key 'revoked' appears twice")


def test_catalogue_yaml_is_typed(signed_catalogue):
    cat = signed_catalogue.cat
    assert cat.config().url == signed_catalogue.url and cat.config().last_version == 1
    cat.config_path.write_text("url: http://a:1/\nlast_version: two\n")
    one_line(refused(DataError, cat.config), str(cat.config_path), "last_version: input should be a valid integer")
    cat.config_path.write_text("url: http://a:1/\norigin: x\n")
    one_line(refused(DataError, cat.config), "origin: unknown key (expected one of: url, last_version)")


def test_merge_keys_may_be_overridden_but_not_repeated():
    assert load_yaml("r: {<<: {x: 1, y: 1}, x: 2}\n", "t.yaml", DataError)["r"] == {"x": 2, "y": 1}
    msg = refused(DataError, load_yaml, "r: {<<: {x: 1}, x: 2, x: 3}\n", "t.yaml", DataError)
    one_line(msg, "t.yaml: malformed YAML at line 1", "key 'x' appears twice")


# --- YAML bombs -----------------------------------------------------------------------------------

# 9 levels of 9 aliases: ~600 bytes, 387 million strings once anything walks `config` (the config
# drive's json.dumps does): gigabytes.
BOMB_SPEC = ("roles:\n  sage:\n    image: sage@1\n    port: 6000\n    config:\n"
             "      l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
             + "".join(f"      l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
             + "      all: *a8\n")
# What the wrapper does with a spec: load it, then serialize the role's config for the guest. Run
# in a child with 1 GiB of address space and a timeout, so a regression fails the test instead of
# exhausting the machine; `hide_libyaml` runs it with PyYAML's pure-Python parser.
BOMB_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
if sys.argv[2] == "pure":
    sys.modules["yaml._yaml"] = None
from cluster.errors import SalvusError
from cluster.spec import load_spec
try:
    spec = load_spec(sys.argv[1])
    json.dumps(spec.roles["sage"].config)
except SalvusError as e:
    print(e)
    sys.exit(e.exit_code)
except MemoryError:
    sys.exit("MemoryError: the aliases were expanded")
"""


@pytest.mark.parametrize("parser", ["libyaml", "pure"])
def test_alias_bomb_refused_before_it_expands(tmp_path, parser):
    import subprocess
    import sys

    path = tmp_path / "cluster.yaml"
    path.write_text(BOMB_SPEC)
    assert len(BOMB_SPEC) < 640
    r = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(path), parser], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 78, (r.returncode, r.stdout, r.stderr[-500:])
    one_line(r.stdout.strip(), f"{path}: malformed YAML at line 6, column 11", "anchor &a0 refused")


@pytest.mark.parametrize("text,where", [
    ("a: &x 1\nb: 2\n", "line 1, column 4: anchor &x refused"),
    ("a: 1\nb: *x\n", "line 2, column 4: alias *x refused"),
    ("[" * 33 + "]" * 33, "line 1, column 33: nested deeper than 32 levels"),
    ("a:\n" + "".join("  " * i + "- \n" for i in range(1, 40)), "line 33, column 65: nested deeper than 32 levels"),
    ("[" * 100_000 + "]" * 100_000, "line 1, column 1001"),  # libyaml's own limit, before ours
    ("- " * 20_000 + "x", "line 1, column 65: nested deeper than 32 levels"),
    ("{a: " * 20_000, "line 1, column 129: nested deeper than 32 levels"),
])
def test_anchors_aliases_and_deep_nesting_are_one_line(text, where):
    one_line(refused(SpecError, load_yaml, text, "t.yaml", SpecError), f"t.yaml: malformed YAML at {where}")
    assert load_yaml("[" * 32 + "]" * 32, "t.yaml", SpecError) is not None


@pytest.mark.parametrize("text,expected", [
    ("a: 2026-13-01\n", "line 1, column 4: '2026-13-01' is not a valid timestamp (month must be in 1..12)"),
    ("a: " + "9" * 5000 + "\n", "line 1, column 4: '999"),
])
def test_unquoted_values_python_cannot_build_are_one_line(text, expected):
    """PyYAML lets a ValueError from int() or date() through: a traceback, not a refusal."""
    one_line(refused(DataError, load_yaml, text, "t.yaml", DataError), f"t.yaml: malformed YAML at {expected}")


PLAIN_DOCS = [
    "", "a", "- 1\n- [2, {b: c}]\n- {}\n- []\n",
    "a: [1, 2.5, .nan, .inf, 0x1F, 0o17, 1_000, true, yes, No, ~, null, '', \"x\", '1', 2026-01-01]\n",
    "s: !!str 123\ni: !!int '7'\nf: !!float '1'\nb: !!binary aGVsbG8=\nx: ! 123\n",
    "%TAG !e! tag:yaml.org,2002:\n---\na: !e!int '5'\n", "a: |\n  x\nb: >\n  p\n  q\nc:\nd: 'x'\n...\n",
    "'a': 1\nb: 1\n", "1: a\n'1': b\n",
]
UNUSUAL_DOCS = ["<<: {a: 1}\nb: 2\n", "=: 1\n", "a: !!set {x, y}\n", "a: !!omap [x: 1]\n", "? [a]\n: 1\n",
                "a: !!map {b: 1}\n", "1: a\n0x1: b\n", "a: 1\n---\nb: 2\n", "a: &x 1\n", "[" * 33 + "]" * 33,
                ".nan: 1\n.nan: 2\n"]  # one cached NaN twice: a repeat here, two keys there


def test_events_path_builds_what_the_composer_builds(signed_catalogue):
    """load_yaml builds plain documents straight from the parser's events and leaves the rest (and
    every refusal) to the strict composer and constructor: where it builds, it builds the same."""
    import yaml

    from cluster.yamlmodel import UniqueKeyLoader, _Unusual

    def typed(v):
        if isinstance(v, dict):
            return [(typed(k), typed(x)) for k, x in v.items()]
        return [typed(x) for x in v] if isinstance(v, list) else (type(v), repr(v))

    index = signed_catalogue.signed()[0].decode()
    for text in [index, *PLAIN_DOCS]:
        loader = UniqueKeyLoader(text)
        assert typed(loader.plain_data()) == typed(yaml.load(text, Loader=UniqueKeyLoader)), text  # noqa: S506
    for text in UNUSUAL_DOCS:
        with pytest.raises(_Unusual):
            UniqueKeyLoader(text).plain_data()
    assert load_yaml(UNUSUAL_DOCS[0], "t.yaml", DataError) == {"a": 1, "b": 2}


# --- full matches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("good,bad", [("sage-1", "sage-1\n"), ("hub-7.42", "hub-7.42\n")])
def test_service_id_with_a_trailing_newline_refused(good, bad):
    assert check_service_id(good) == good and is_service_id(good)
    assert not is_service_id(bad)
    one_line(refused(SpecError, check_service_id, bad), "--service-id: expected letters, digits", repr(bad))


def test_image_ref_and_name_with_a_trailing_newline_refused():
    assert split_image_ref("demo@1") == ("demo", "1")
    for ref in ("demo@1\n", "demo\n@1", "demo@1\r"):
        with pytest.raises(ValueError, match="expected NAME@VERSION"):
            split_image_ref(ref)
    assert is_name("sage") and not is_name("sage\n")


@pytest.mark.parametrize("yaml_text,expected", [
    ("roles: {sage: {image: \"demo@1\\n\", port: 6000}}", "roles.sage.image: expected NAME@VERSION"),
    ("roles: {\"sage\\n\": {image: demo@1, port: 6000}}", "role name 'sage\\n': expected [a-z][a-z0-9_-]*"),
    ("roles: {sage: {image: demo@1, port: 6000, persistent: [{name: \"data\\n\", size_mb: 1}]}}",
     "roles.sage.persistent[0].name: expected a short lowercase name"),
    ("roles: {}\nregistry: {cassandra: {contact_points: [a], keyspace: \"salvus\\n\"}}",
     "registry.cassandra.keyspace: expected a keyspace name"),
])
def test_spec_names_with_a_trailing_newline_refused(tmp_path, yaml_text, expected):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml_text + "\n")
    one_line(refused(SpecError, load_spec, path), str(path), expected)


@pytest.mark.parametrize("old,new,expected", [
    (b"- name: demo\n", b"- name: \"demo\\n\"\n", "entries[0].name: expected letters, digits"),
    (b"  version: '1'\n", b"  version: \"1\\n\"\n", "entries[0].version: expected letters, digits"),
    (b"  roles: [sage]\n", b"  roles: [\"sage\\n\"]\n", "entries[0].roles[0]: expected a short lowercase name"),
    (b"torrent: torrents/demo-1.torrent\n", b"torrent: \"torrents/demo-1.torrent\\n\"\n",
     "entries[0].torrent: expected 'torrents/NAME-VERSION.torrent'"),
    (b"  targets: []\n", b"  targets: [\"hv1\\n\"]\n", "entries[0].targets[0]: expected a host or cluster name"),
    (b"  targets: []\n", b"  targets: []\nrevoked: [\"demo@0\\n\"]\n", "revoked[0]: expected NAME@VERSION"),
])
def test_index_fields_with_a_trailing_newline_refused(signed_catalogue, old, new, expected):
    raw = signed_catalogue.signed()[0]
    assert old in raw
    one_line(refused(DataError, parse_index, raw.replace(old, new, 1)), "index.yaml: " + expected)


def test_index_sha256_with_a_trailing_newline_refused(signed_catalogue):
    raw = signed_catalogue.signed()[0]
    digest = parse_index(raw).entries[0].sha256
    bad = raw.replace(f"sha256: {digest}".encode(), f"sha256: \"{digest}\\n\"".encode())
    one_line(refused(DataError, parse_index, bad), "entries[0].sha256: expected 64 lowercase hex digits")


def test_approval_with_a_trailing_newline_refused(signed_catalogue):
    spec = signed_catalogue.spec()
    one_line(refused(SpecError, approvals.approve, spec, "demo@1\n"), "approval 'demo@1\\n': expected NAME@VERSION")
    path = approvals.approvals_path(spec)
    path.parent.mkdir(parents=True)
    path.write_text("approved: [demo@*, \"demo@1\\n\"]\n")
    one_line(refused(DataError, approvals.load_approvals, spec), f"{path}: approved[1]: expected NAME@VERSION")


# --- the models keep what the hand-written checker did --------------------------------------------

def test_index_round_trips_through_yaml_and_its_json_copy(signed_catalogue):
    index = parse_index(signed_catalogue.signed()[0])
    assert isinstance(index, Index) and index.entries[0].ref == "demo@1"
    assert parse_index(index.render()) == index
    assert Index.from_json(index.to_json()) == index


def test_index_times_must_be_quoted_utc(signed_catalogue):
    raw = signed_catalogue.signed()[0]
    issued = parse_index(raw).issued.strftime("%Y-%m-%dT%H:%M:%SZ")
    unquoted = raw.replace(f"issued: '{issued}'".encode(), f"issued: {issued}".encode())
    one_line(refused(DataError, parse_index, unquoted), "issued: expected a quoted UTC time", "unquoted")
    other = raw.replace(f"issued: '{issued}'".encode(), b"issued: '2026-13-01T00:00:00Z'")
    one_line(refused(DataError, parse_index, other), "issued: expected a quoted UTC time", "2026-13-01")


def test_index_without_its_schema_line_refused(signed_catalogue):
    raw = signed_catalogue.signed()[0]
    line = f"schema: {SCHEMA}\n".encode()
    assert line in raw
    one_line(refused(DataError, parse_index, raw.replace(line, b"")),
             "index.yaml: schema: required field is missing")
    one_line(refused(DataError, parse_index, raw.replace(line, b"schema: salvus-image-index/3\n")),
             "index.yaml: schema: 'salvus-image-index/3' is not a version this salvus-jobs reads",
             "needs a newer salvus-jobs")


def test_draft_entry_listed_twice_refused(signed_catalogue):
    cat = signed_catalogue.cat
    text = cat.draft_path.read_text()
    body = text.split("entries:\n", 1)[1].split("revoked:")[0]
    cat.draft_path.write_text(text.replace("entries:\n", "entries:\n" + body, 1))
    one_line(refused(DataError, cat.draft), str(cat.draft_path), "entries[1]: demo@1 is listed twice")


def test_add_refuses_a_role_the_index_would_refuse(signed_catalogue):
    sc = signed_catalogue
    before = tree_snapshot(sc.cat.root)
    msg = refused(SpecError, add_image, sc.cat, sc.image, "demo", "2", ["sage\n"], [], sc.url)
    one_line(msg, "catalogue add: roles[0]: expected a short lowercase name", repr("sage\n"))
    assert tree_snapshot(sc.cat.root) == before


def test_duplicate_keys_refused_with_the_pure_python_parser_too():
    """UniqueKeyLoader uses libyaml's parser when PyYAML has it; the refusal is in the constructor,
    so the pure-Python parser (no libyaml) refuses the same way."""
    import yaml

    from cluster.yamlmodel import UniqueKeyLoader
    pure = type("PureUniqueKeyLoader", (yaml.SafeLoader,), {"construct_mapping": UniqueKeyLoader.construct_mapping})
    with pytest.raises(yaml.constructor.ConstructorError, match="key 'b' appears twice") as info:
        yaml.load("a: 1\nb: 2\nb: 3\n", Loader=pure)  # noqa: S506 - a SafeLoader subclass
    assert info.value.problem_mark.line == 2
    assert yaml.load("a: {b: 1}\nc: {b: 2}\n", Loader=pure) == {"a": {"b": 1}, "c": {"b": 2}}  # noqa: S506
