"""Catalogue benchmark: verifying a 1,000-entry signed index, and the pre-boot check of a 1 GiB image.

1. `verify` of a 1,000-entry index (signature + structure; image bytes excluded): ours (Ed25519 over
   the exact bytes first, then a strict parse with libyaml's safe loader) beside the naive verifier
   (`yaml.safe_load` in pure Python, canonicalize to JSON, verify the signature of that form),
   median of several runs.
2. The pre-boot check (`catalogue.trust.verified_image`, all four checks, against the same
   1,000-entry accepted index) of a 1 GiB image: uncached (hashing at every boot, the naive way)
   beside cached (file stamps unchanged, digest reused).

    .venv/bin/python benchmarks/catalogue_bench.py [--entries 1000] [--image-mib 1024] [--runs 7]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from catalogue import approvals, trust  # noqa: E402
from catalogue.hashcache import sha256_file  # noqa: E402
from catalogue.imagefile import open_image  # noqa: E402
from catalogue.index import Entry, Index, new_signature_file, now_utc, sign_index_bytes  # noqa: E402
from catalogue.keys import public_pem  # noqa: E402
from cluster.spec import parse_spec  # noqa: E402
from cluster.store import Store  # noqa: E402


def synthetic_index(n: int, version: int = 1) -> Index:
    now = now_utc()
    entries = [Entry(name=f"img{i:05d}", version=f"{i % 7}.{i % 13}", sha256=hashlib.sha256(b"%d" % i).hexdigest(),
                     size=1 << 30, format="qcow2", roles=["sage", "hub"],
                     info_hash=hashlib.sha256(b"t%d" % i).hexdigest(), torrent=f"torrents/img{i:05d}.torrent",
                     web_seeds=["http://origin.example.org:8765/images/"], created=now,
                     targets=[f"hv{i % 40:02d}"]) for i in range(n)]
    return Index(version=version, issued=now, expires=now + timedelta(days=30), entries=entries)


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def naive_verify(raw: bytes, sig: bytes, key) -> None:
    """What a verifier that re-serializes does: parse, canonical JSON, verify over that. (Slower, and
    the signed thing is no longer the file on disk: two parsers may disagree on what was signed.)"""
    doc = yaml.safe_load(raw)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
    key.public_key().verify(key.sign(canonical), canonical)  # the endorser would have signed this form


def bench_verify(n: int, runs: int) -> tuple[float, float, int]:
    key = Ed25519PrivateKey.generate()
    raw = synthetic_index(n).render()
    sig = new_signature_file([sign_index_bytes(raw, key)])
    pub = key.public_key()
    ours = median_ms(lambda: trust.check_signed_index(raw, sig, [pub], 1, 16 << 20), runs)
    naive = median_ms(lambda: naive_verify(raw, sig, key), runs)
    return ours, naive, len(raw)


def write_image(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[:-8] + i.to_bytes(8, "big"))  # distinct blocks, cheap to generate


def bench_preboot(root: Path, mib: int, entries: int, runs: int) -> tuple[float, float, float, float]:
    """(verified_image uncached, cached, hash step alone uncached, cached) in ms."""
    key = Ed25519PrivateKey.generate()
    (root / "endorser.pub").write_bytes(public_pem(key.public_key()))
    spec = parse_spec(f"store: {root}/store\ncatalogue: {{trust: {{keys: [{root}/endorser.pub]}}}}\n"
                      "roles: {sage: {image: big@1, port: 6000}}\n", root / "cluster.yaml")
    image = Store.of(spec).base / "big-1.raw"  # raw: the bytes are hashed, not booted
    image.parent.mkdir(parents=True)
    write_image(image, mib)
    index = synthetic_index(entries)
    index.entries += [Entry(name="big", version="1", sha256=sha256_file(image), size=image.stat().st_size,
                           format="raw", roles=[], info_hash="0" * 64, torrent="torrents/big-1.torrent",
                           web_seeds=["http://o:1/images/"], created=now_utc())]
    raw = index.render()
    trust.accept_index(spec, raw, new_signature_file([sign_index_bytes(raw, key)]))
    approvals.approve(spec, "big@1")
    cache = trust.hash_cache_path(spec)

    def uncached() -> None:
        cache.unlink(missing_ok=True)
        trust.verified_image(spec, "sage").close()

    uncached_ms = median_ms(uncached, max(3, runs // 2))
    trust.verified_image(spec, "sage").close()
    cached_ms = median_ms(lambda: trust.verified_image(spec, "sage").close(), runs)
    entry = index.entries[-1]
    image = open_image(image, entry.format, None)

    def hash_uncached() -> None:
        cache.unlink(missing_ok=True)
        trust.check_image_bytes(spec, entry, image)

    hash_uncached_ms = median_ms(hash_uncached, max(3, runs // 2))
    hash_cached_ms = median_ms(lambda: trust.check_image_bytes(spec, entry, image), runs)
    return uncached_ms, cached_ms, hash_uncached_ms, hash_cached_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--image-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    ours, naive, size = bench_verify(args.entries, args.runs)
    print(f"verify {args.entries}-entry index ({size / 1024:.0f} KiB), signature + structure, median of {args.runs}:")
    print(f"  ours  (Ed25519 over exact bytes, then strict libyaml safe parse) {ours:9.1f} ms")
    print(f"  naive (yaml.safe_load in Python, canonical JSON, verify that)    {naive:9.1f} ms")
    with tempfile.TemporaryDirectory(prefix="catalogue-bench-") as tmp:
        uncached, cached, h_uncached, h_cached = bench_preboot(Path(tmp), args.image_mib, args.entries, args.runs)
    print(f"pre-boot check of a {args.image_mib} MiB image (verified_image: index fresh, endorsed, approved, hash):")
    print(f"  naive: hash at every boot                        {uncached:9.1f} ms")
    print(f"  ours:  digest cached on (path,size,mtime,ctime,inode) {cached:4.1f} ms  "
          f"({uncached / cached:.1f}x faster)")
    print(f"  of which the hash step: {h_uncached:.1f} ms uncached, {h_cached:.2f} ms cached; the rest is "
          f"re-checking the signature of the {args.entries}-entry accepted index and loading its parsed copy")
    print(f"verify_entries={args.entries} verify_ms={ours:.1f} naive_verify_ms={naive:.1f} image_mib={args.image_mib} "
          f"preboot_uncached_ms={uncached:.0f} preboot_cached_ms={cached:.0f} "
          f"hash_uncached_ms={h_uncached:.0f} hash_cached_ms={h_cached:.2f} speedup={uncached / cached:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
