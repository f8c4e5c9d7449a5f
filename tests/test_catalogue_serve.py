"""The catalogue's HTTP origin (`salvus_jobs catalogue serve`) over real HTTP: a signed index
round-trips to an accepting host, images are served with Range requests, and a libtorrent client
completes a v2 torrent from the web seed alone."""
from __future__ import annotations

import hashlib
import http.client
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import timedelta
from pathlib import Path

import libtorrent as lt
import pytest

from catalogue import approvals, trust
from catalogue.endorse import add_image, sign_index
from catalogue.serve import make_server
from catalogue.torrent import check_torrent
from cluster.store import Store
from tests.fixtures.catalogue import tree_snapshot
from tests.http_burst import statuses_of_a_burst


@pytest.fixture
def origin(signed_catalogue):
    """`salvus_jobs catalogue serve` on a free port; yields its base URL and stops it with SIGTERM."""
    exe = Path(sys.executable).parent / "salvus_jobs"
    proc = subprocess.Popen([str(exe), "catalogue", "serve", "--dir", str(signed_catalogue.cat.root),
                             "--bind", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield line.split(" at ")[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, u.path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_signed_index_round_trips_through_serve(signed_catalogue, origin, cli):
    sc = signed_catalogue
    r = cli("catalogue", "accept", "--spec", str(sc.spec_path), "--url", origin)
    assert r.returncode == 0, r.stderr
    assert f"index version 1 from {origin}: accepted (was none)" in r.stdout
    spec = sc.spec()
    stored = next(Store(sc.store).trust.catalogue_dir.glob("index-1-*.yaml"))
    assert stored.read_bytes() == sc.cat.index_path.read_bytes()
    approvals.approve(spec, "demo@1")
    entry = trust.accepted_index(spec).find("demo", "1")
    # The fixture's index names another origin URL; the file layout under it is the same.
    assert entry.http_urls == [signed_catalogue.url + "images/demo-1.qcow2"]
    status, _, body = get(origin + "images/" + entry.file_name)
    assert status == 200 and hashlib.sha256(body).hexdigest() == entry.sha256
    dest = sc.store / "images" / "base" / entry.file_name
    dest.parent.mkdir(parents=True)
    dest.write_bytes(body)
    assert trust.verified_image(spec, "sage").path == dest.resolve()
    status, _, torrent = get(origin + entry.torrent)
    assert status == 200 and check_torrent(entry, torrent).info_hashes().v2


def test_serve_honours_range_requests(signed_catalogue, origin):
    image = (signed_catalogue.cat.root / "images" / "demo-1.qcow2").read_bytes()
    url = origin + "images/demo-1.qcow2"
    status, h, body = get(url, {"Range": "bytes=100-1123"})
    assert status == 206 and body == image[100:1124]
    assert h["content-range"] == f"bytes 100-1123/{len(image)}" and h["content-length"] == "1024"
    status, h, body = get(url, {"Range": "bytes=-10"})
    assert status == 206 and body == image[-10:]
    status, h, body = get(url, {"Range": f"bytes={len(image) - 5}-"})
    assert status == 206 and body == image[-5:]
    status, h, _ = get(url, {"Range": f"bytes={len(image)}-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(image)}"
    status, h, body = get(url, {"Range": "bytes=0-1,5-6"})  # multi-range: the whole file is valid
    assert status == 200 and body == image
    status, h, body = get(url, method="HEAD")
    assert status == 200 and h["accept-ranges"] == "bytes" and int(h["content-length"]) == len(image) and body == b""


@pytest.mark.parametrize("path", ["entries.yaml", "catalogue.yaml", "images/../index.yaml",
                                  "images/%2e%2e/catalogue.yaml", "images/..%2fcatalogue.yaml", "torrents/",
                                  "images/.hidden", "../../etc/passwd", "index.yaml/"])
def test_serve_publishes_only_the_catalogue_paths(signed_catalogue, origin, path):
    (signed_catalogue.cat.root / "images" / ".hidden").write_bytes(b"secret")
    status, _, body = get(origin + path)
    assert status == 404 and b"secret" not in body


def test_web_seed_alone_completes_the_v2_torrent(signed_catalogue, origin, tmp_path):
    """The metainfo `add` makes names the origin's images/ directory as web seed; libtorrent must
    fetch the image from `serve` with Range requests and every piece must hash-check."""
    sc = signed_catalogue
    big = tmp_path / "big.img"
    big.write_bytes(bytes(range(256)) * 8192 + b"tail")  # 2 MiB + 4 bytes, several pieces
    entry = add_image(sc.cat, big, "big", "1", [], [], origin)
    sign_index(sc.cat, sc.key(), timedelta(days=1))
    status, _, metainfo = get(origin + entry.torrent)
    ti = check_torrent(entry, metainfo)
    assert ti.num_pieces() > 1
    ses = lt.session({"enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
                      "listen_interfaces": "127.0.0.1:0"})
    params = lt.add_torrent_params()
    params.ti = ti
    params.save_path = str(tmp_path / "dl")
    handle = ses.add_torrent(params)
    deadline = time.monotonic() + 120
    while not handle.status().is_seeding and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle.status().is_seeding, handle.status().state
    ses.remove_torrent(handle)
    got = (tmp_path / "dl" / entry.file_name).read_bytes()
    assert hashlib.sha256(got).hexdigest() == entry.sha256


def test_serve_refuses_a_directory_without_index(tmp_path, cli):
    r = cli("catalogue", "serve", "--dir", str(tmp_path), "--bind", "127.0.0.1:0")
    assert r.returncode == 78 and "no index.yaml to serve" in r.stderr
    assert tree_snapshot(tmp_path) == {}


def test_accept_over_http_refuses_an_oversized_index_unread(signed_catalogue, origin, cli):
    sc = signed_catalogue
    sc.write_spec(extra="  max_index_bytes: 4096\n")
    sc.cat.index_path.write_bytes(sc.cat.index_path.read_bytes() + b"#" * 8192)
    before = tree_snapshot(sc.store)
    r = cli("catalogue", "accept", "--spec", str(sc.spec_path), "--url", origin)
    assert r.returncode == 65 and "exceeds the limit of 4096 bytes; refused unread" in r.stderr, r.stderr
    assert tree_snapshot(sc.store) == before


def test_accept_from_an_unreachable_origin_is_transient(signed_catalogue, cli):
    r = cli("catalogue", "accept", "--spec", str(signed_catalogue.spec_path), "--url", "http://127.0.0.1:9/")
    assert r.returncode == 75 and "cannot fetch" in r.stderr, r.stderr


def test_origin_takes_a_whole_sites_simultaneous_syncs(signed_catalogue):
    """32 hypervisors syncing at once all connect before the origin accepts one (socketserver's
    backlog of 5 dropped the 7th SYN), and each is then answered."""
    server = make_server(signed_catalogue.cat.root)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        statuses = statuses_of_a_burst(server.server_address[1], [b"GET /index.yaml HTTP/1.0\r\n\r\n"] * 32,
                                       serving.start)
        assert statuses == [200] * 32
    finally:
        if serving.is_alive():
            server.shutdown()
        server.server_close()
