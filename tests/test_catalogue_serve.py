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


def test_serve_ignores_an_inverted_range_and_refuses_a_huge_one(signed_catalogue, origin):
    image = (signed_catalogue.cat.root / "images" / "demo-1.qcow2").read_bytes()
    url = origin + "images/demo-1.qcow2"
    status, _, body = get(url, {"Range": "bytes=5-3"})  # RFC 9110: invalid, so ignored
    assert status == 200 and body == image
    status, h, _ = get(url, {"Range": "bytes=" + "9" * 5000 + "-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(image)}"
    status, _, body = get(url, {"Range": "bytes=10-" + "9" * 5000})  # past the end: up to the end
    assert status == 206 and body == image[10:]
    status, _, body = get(url, {"Range": "bytes=-" + "9" * 5000})  # a suffix longer than the file
    assert status == 206 and body == image


def test_serve_follows_no_symlink_out_of_the_catalogue(signed_catalogue, origin, tmp_path):
    images = signed_catalogue.cat.root / "images"
    (tmp_path / "outside").write_bytes(b"root:x:0:0")
    (images / "passwd.qcow2").symlink_to(tmp_path / "outside")
    (images / "alias.qcow2").symlink_to(images / "demo-1.qcow2")  # within images/: still served
    assert get(origin + "images/passwd.qcow2")[0] == 404
    status, _, body = get(origin + "images/alias.qcow2")
    assert status == 200 and body == (images / "demo-1.qcow2").read_bytes()


def exchange(origin: str, request: bytes) -> bytes:
    """Everything the origin sends for raw `request` bytes until it closes (or 5 s of silence)."""
    import socket
    u = urllib.parse.urlsplit(origin)
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            pass
    return out


def test_serve_reads_a_get_body_or_closes_the_connection(origin):
    get_sig = b"GET /index.yaml.sig HTTP/1.1\r\nHost: x\r\n"
    # A small body is read and dropped: the next request on the connection is answered, not the body.
    out = exchange(origin, get_sig + b"Content-Length: 22\r\n\r\nGET /etc/passwd HTTP/1" + get_sig
                   + b"Connection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"400" not in out, out[:300]
    # A large or chunked body: one answer, then the connection closes (never parsed as requests).
    for body_header in (b"Content-Length: 99999999\r\n", b"Transfer-Encoding: chunked\r\n"):
        out = exchange(origin, get_sig + body_header + b"\r\nGET /index.yaml HTTP/1.1\r\n\r\n")
        assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200 OK"), out[:300]
