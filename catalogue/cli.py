"""`salvus_jobs catalogue ...`: endorse images (keygen, add, revoke, sign, verify, list, serve) and
trust them on the site (approve, unapprove, accept)."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

from cluster.cliframe import format_table
from cluster.errors import DataError, SpecError
from cluster.spec import MAX_INDEX_LIFETIME_DAYS, ClusterSpec, load_spec, split_image_ref
from catalogue import approvals, trust
from catalogue.endorse import CatalogueDir, add_image, cosign_index, revoke, sign_index, verify_catalogue
from catalogue.fetch import fetch_signed_index
from cluster.files import read_limited
from catalogue.index import DEFAULT_MAX_INDEX_BYTES, Index, format_time, now_utc
from catalogue.keys import generate_key, key_id, load_private_key, load_trust_keys, public_pem, read_passphrase

DIR_ENV = "SALVUS_CATALOGUE_DIR"
_DURATION_RE = re.compile(r"(\d+)([smhdw])")  # use with fullmatch
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    m = _DURATION_RE.fullmatch(text)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90m, got {text!r}")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    # The cap keeps timedelta from overflowing and an index from outliving every site's limit.
    if seconds > MAX_INDEX_LIFETIME_DAYS * 86400:
        raise argparse.ArgumentTypeError(f"at most {MAX_INDEX_LIFETIME_DAYS}d, got {text!r}")
    return timedelta(seconds=seconds)


def positive_int(text: str) -> int:
    """A count of at least 1 (`--threshold 0` or `-1` would accept an index nobody signed)."""
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def image_ref(text: str) -> str:
    try:
        split_image_ref(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    cat = sub.add_parser("catalogue", help="the signed image catalogue: endorse, approve, verify, publish",
                         description="Endorser side: keygen, add, revoke, sign, verify, list, serve. "
                                     "Site side (uses --spec to find the store): approve, unapprove, accept.")
    csub = cat.add_subparsers(dest="catalogue_command", metavar="ACTION", required=True)
    d = argparse.ArgumentParser(add_help=False)
    d.add_argument("--dir", metavar="CATALOGUE_DIR", type=Path, default=None,
                   help=f"the catalogue directory (default ${DIR_ENV}, else .)")

    def action(name: str, func, help_text: str, epilog: str) -> argparse.ArgumentParser:
        p = csub.add_parser(name, parents=[common, d], help=help_text, description=help_text, epilog=epilog)
        p.set_defaults(func=func)
        return p

    p = action("keygen", cmd_keygen, "make an Ed25519 endorser key pair (private key encrypted)",
               "passphrase from $SALVUS_KEY_PASSPHRASE or a prompt; example: catalogue keygen --out endorser.key")
    p.add_argument("--out", type=Path, required=True, help="private key file; the public key goes to FILE.pub")
    p = action("add", cmd_add, "add an image (or a direct-boot kernel/initrd: a raw entry) to the catalogue's "
               "draft (hash, size, format, torrent)",
               "example: catalogue add --dir cat demo.qcow2 --name demo --version 1 --role sage "
               "--url http://origin:8765/")
    p.add_argument("image", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--role", action="append", default=[], help="a role that may boot it (repeatable; none = any)")
    p.add_argument("--target", action="append", default=[], help="a host/cluster it is meant for (repeatable)")
    p.add_argument("--url", help="the origin's base URL for web seeds (remembered for later adds)")
    p.add_argument("--image-expires", type=parse_duration, metavar="DURATION", help="end of life, e.g. 365d")
    p = action("sign", cmd_sign, "write index.yaml (next version) and its detached signature",
               "example: SALVUS_KEY_PASSPHRASE=... catalogue sign --dir cat --key endorser.key --expires 30d")
    p.add_argument("--key", type=Path, required=True, help="encrypted private key file")
    p.add_argument("--expires", type=parse_duration, default=timedelta(days=30), metavar="DURATION",
                   help="validity, e.g. 30d, 12h (default 30d)")
    p.add_argument("--cosign", action="store_true",
                   help="add this key's signature to the published index instead of signing a new version")
    p = action("verify", cmd_verify, "check the signature, expiry and every image and torrent",
               "one line per problem, exit 65 on any; example: catalogue verify --dir cat --trust endorser.key.pub")
    p.add_argument("--trust", type=Path, action="append", default=[], metavar="PUBKEY",
                   help="trusted public key (repeatable; default: the spec's catalogue.trust.keys)")
    p.add_argument("--threshold", type=positive_int, help="signatures needed (default: the spec's, else 1)")
    p = action("list", cmd_list, "entries with endorsed/approved/expired state",
               "approval state needs --spec; example: catalogue list --dir cat --spec cluster.yaml")
    p.add_argument("--trust", type=Path, action="append", default=[], metavar="PUBKEY")
    p = action("revoke", cmd_revoke, "drop NAME@VERSION from the next signed index (endorser side)",
               "example: catalogue revoke --dir cat demo@1 && catalogue sign --dir cat --key endorser.key")
    p.add_argument("ref", type=image_ref, metavar="NAME@VERSION")
    for name, func, text in (("approve", cmd_approve, "let this site boot NAME@VERSION (or NAME@*)"),
                             ("unapprove", cmd_unapprove, "withdraw this site's approval of NAME@VERSION")):
        p = action(name, func, text, f"site side, in STORE/trust/approvals.yaml; example: catalogue {name} "
                                     "--spec cluster.yaml demo@1")
        p.add_argument("ref", metavar="NAME@VERSION")
    p = action("accept", cmd_accept, "verify the signed index and make it this host's accepted index",
               "from --url, else the spec's catalogue.url, else --dir; example: catalogue accept --spec "
               "cluster.yaml --dir cat")
    p.add_argument("--url", help="origin base URL to fetch index.yaml and index.yaml.sig from")
    p = action("serve", cmd_serve, "HTTP origin for index, signature, torrents and images (Range requests)",
               "example: catalogue serve --dir cat --bind 0.0.0.0:8765")
    p.add_argument("--bind", default="127.0.0.1:8765", help="HOST:PORT (port 0 picks a free one)")
    p = action("nginx-conf", cmd_nginx_conf, "print an nginx server block serving the catalogue (the "
               "production origin: Range, keep-alive, timeouts)",
               "example: catalogue nginx-conf --dir /srv/catalogue --listen 8765 > /etc/nginx/conf.d/salvus-catalogue.conf")
    p.add_argument("--listen", default="8765", help="PORT or HOST:PORT (default 8765)")


def _dir(args: argparse.Namespace) -> Path:
    return args.dir or Path(os.environ.get(DIR_ENV, "."))


def _spec(args: argparse.Namespace) -> ClusterSpec:
    return load_spec(args.spec)


def _optional_spec(args: argparse.Namespace) -> ClusterSpec | None:
    try:
        return load_spec(args.spec)
    except SpecError:
        if args.spec:
            raise
        return None


def cmd_keygen(args: argparse.Namespace) -> int:
    public = generate_key(args.out, read_passphrase(confirm=True))
    sys.stdout.write(public_pem(public).decode())
    print(f"key id {key_id(public)}; private key {args.out} (encrypted), public key {args.out}.pub")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    expires = now_utc() + args.image_expires if args.image_expires else None
    entry = add_image(CatalogueDir(_dir(args)), args.image, args.name, args.version, args.role, args.target,
                      args.url, expires)
    print(f"added {entry.ref}: {entry.size} bytes {entry.format} (virtual size {entry.virtual_size} bytes) "
          f"sha256 {entry.sha256} "
          f"info_hash {entry.info_hash} (unsigned until `catalogue sign`)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    cat = CatalogueDir(_dir(args))
    key = load_private_key(args.key, read_passphrase())
    index = cosign_index(cat, key) if args.cosign else sign_index(cat, key, args.expires)
    what = "co-signed" if args.cosign else "signed"
    print(f"{what} index version {index.version}: {len(index.entries)} entries, {len(index.revoked)} revoked, "
          f"expires {format_time(index.expires)}, key {key_id(key.public_key())}")
    return 0


def _keys_and_threshold(args: argparse.Namespace) -> tuple[list, int]:
    if args.trust:
        return load_trust_keys([str(p) for p in args.trust], "--trust"), getattr(args, "threshold", None) or 1
    spec = _optional_spec(args)
    if spec is None or not spec.catalogue.trust.keys:
        raise SpecError("no trust anchors: pass --trust PUBKEY or a --spec with catalogue.trust.keys")
    return trust.trust_keys(spec), getattr(args, "threshold", None) or spec.catalogue.trust.threshold


def cmd_verify(args: argparse.Namespace) -> int:
    keys, threshold = _keys_and_threshold(args)
    index, problems = verify_catalogue(CatalogueDir(_dir(args)), keys, threshold)
    for p in problems:
        print(p)
    if problems:
        raise DataError(f"{_dir(args)}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
    assert index is not None
    print(f"ok: index version {index.version}, {len(index.entries)} entries, signatures and image hashes "
          f"verified, expires {format_time(index.expires)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cat = CatalogueDir(_dir(args))
    spec = _optional_spec(args)
    signed_index: Index | None = None
    verified = False
    signed = cat.signed_bytes()
    if signed:
        try:
            keys, threshold = _keys_and_threshold(args)
            signed_index = trust.check_signed_index(signed[0], signed[1], keys, threshold,
                                                    DEFAULT_MAX_INDEX_BYTES, str(cat.index_path))
            verified = True
        except SpecError:
            signed_index = cat.signed_index_unverified()  # no anchors to check with: say so per row
        except DataError as e:
            print(f"warning: {e}", file=sys.stderr)
            signed_index = cat.signed_index_unverified()
    draft, revoked = cat.draft()
    refs = {e.ref: e for e in draft}
    refs.update({e.ref: e for e in (signed_index.entries if signed_index else [])})
    rows = []
    for ref, e in sorted(refs.items()):
        in_signed = signed_index is not None and signed_index.find(e.name, e.version) is not None
        if ref in revoked:
            endorsed = "revoking" if in_signed else "revoked"  # "revoking": until the next sign
        elif not in_signed:
            endorsed = "pending"
        else:
            endorsed = "yes" if verified and not signed_index.expired() else (  # type: ignore[union-attr]
                "expired" if signed_index.expired() else "unverified")  # type: ignore[union-attr]
        approved = ("yes" if approvals.is_approved(spec, e.name, e.version) else "no") if spec else "-"
        expires = format_time(e.expires) + (" (expired)" if e.expired() else "") if e.expires else "-"
        virtual = "-" if e.virtual_size is None else str(e.virtual_size)  # "-": an entry from before schema 2
        rows.append([ref, str(e.size), virtual, e.format, ",".join(e.roles) or "*", endorsed, approved, expires])
    for ref in sorted(set(revoked) - set(refs)):  # withdrawn: no entry left, only the revocation
        rows.append([ref, "-", "-", "-", "-", "revoked", "-", "-"])
    print(format_table(["IMAGE", "SIZE", "VIRTUAL", "FORMAT", "ROLES", "ENDORSED", "APPROVED", "EXPIRES"], rows))
    if signed_index:
        print(f"index version {signed_index.version}, expires {format_time(signed_index.expires)}"
              f"{' (EXPIRED)' if signed_index.expired() else ''}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    changed = revoke(CatalogueDir(_dir(args)), args.ref)
    print(f"{'revoked' if changed else 'already revoked'} {args.ref}; it is dropped by the next `catalogue sign`")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    spec = _spec(args)
    changed = approvals.approve(spec, args.ref)
    print(f"{'approved' if changed else 'already approved'} {args.ref} in {approvals.approvals_path(spec)}")
    index = trust.trusted_accepted_index(spec)
    name, _, version = args.ref.partition("@")
    if version != "*" and (index is None or index.find(name, version) is None):
        where = f"this host's accepted index (version {index.version})" if index else "any accepted index"
        print(f"note: {args.ref} is not in {where} yet; its bytes are pinned when an accepted index lists it",
              file=sys.stderr)
    return 0


def cmd_unapprove(args: argparse.Namespace) -> int:
    spec = _spec(args)
    changed = approvals.unapprove(spec, args.ref)
    print(f"{'unapproved' if changed else 'was not approved:'} {args.ref} in {approvals.approvals_path(spec)}")
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    spec = _spec(args)
    # An explicit --url or --dir wins; then the spec's origin; then $SALVUS_CATALOGUE_DIR or '.'.
    url = args.url or (spec.catalogue.url if args.dir is None else None)
    if url:
        raw, sig = fetch_signed_index(url, spec.catalogue.max_index_bytes)
        source = url
    else:
        cat = CatalogueDir(_dir(args))
        raw = read_limited(cat.index_path, spec.catalogue.max_index_bytes)
        sig = read_limited(cat.sig_path, 1 << 16)
        source = str(cat.root)
    before = trust.accepted_version(spec)
    index = trust.accept_index(spec, raw, sig)
    state = "already accepted" if index.version == before else f"accepted (was {before or 'none'})"
    print(f"index version {index.version} from {source}: {state}; {len(index.entries)} entries, "
          f"expires {format_time(index.expires)}")
    return 0


def cmd_nginx_conf(args: argparse.Namespace) -> int:
    from catalogue.nginx import site_config
    root = _dir(args).resolve()
    if not (root / "index.yaml").exists():
        raise SpecError(f"{root}: no index.yaml to serve (run `catalogue sign` first)")
    print(site_config(root, args.listen), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from catalogue.serve import base_url, make_server
    host, _, port = args.bind.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise SpecError(f"--bind: expected HOST:PORT with PORT 0-65535, got {args.bind!r}")
    root = _dir(args)
    if not (root / "index.yaml").exists():
        raise SpecError(f"{root}: no index.yaml to serve (run `catalogue sign` first)")
    try:
        server = make_server(root, host, int(port))
    except OSError as e:
        raise SpecError(f"--bind {args.bind}: {e.strerror or e}") from None
    # SIGTERM ends serve_forever cleanly. shutdown() waits for the loop to stop, so it must run in
    # another thread. (Raising KeyboardInterrupt from the handler, as before, can land inside the
    # server's own locking; once a test waited 30 s in vain for it to exit after SIGTERM.)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"serving {root.resolve()} at {base_url(server)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
