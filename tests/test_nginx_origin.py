"""The production origin: Debian's nginx with the server block `catalogue nginx-conf` prints,
run for real on a loopback port with a generated nginx.conf. imgdist fetches the signed index,
the torrent and (as BitTorrent web seed) every piece through it; only the catalogue's paths are
published; Range and keep-alive work; half-open requests are cut off."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from catalogue.nginx import NginxLimits, site_config
from tests.fixtures.imgdist_lab import PASSPHRASE, Lab, free_port
from tests.polling import wait_for
from tests.test_catalogue_serve import get
from tests.test_http_limits import closed_by_server
from tests.test_imgdist_swarm import assert_installed

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LOG_FORMAT = '$request_method $uri $status "$http_range" $connection $connection_requests'


def main_config(work: Path, site: str) -> str:
    """A whole nginx.conf around the site block: pid, logs and temp files in `work`."""
    temps = "\n".join(f"    {kind}_temp_path {work / kind};" for kind in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root nginx's workers would switch to nobody, who cannot read pytest's 0700 tmp_path.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (f"{user}daemon off;\nworker_processes 1;\npid {work / 'nginx.pid'};\nerror_log {work / 'error.log'} info;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    log_format t '{LOG_FORMAT}';\n    access_log {work / 'access.log'} t;\n{temps}\n"
            + site + "}\n")


class Nginx:
    def __init__(self, root: Path, work: Path, limits: NginxLimits):
        assert Path(NGINX).exists(), "nginx is not installed: run `scripts/setup imgdist`"
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.work = work
        conf = work / "nginx.conf"
        conf.write_text(main_config(work, site_config(root, f"127.0.0.1:{self.port}", limits)))
        self.proc = subprocess.Popen([NGINX, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.proc.poll() is None, (work / "error.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(listening, 20, "nginx listening", interval=0.05)

    def access_log(self) -> list[list[str]]:
        return [re.findall(r'"[^"]*"|\S+', line) for line in (self.work / "access.log").read_text().splitlines()]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # the master stops its workers
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nginx_lab(tmp_path: Path):
    """imgdist_lab's catalogue and hosts, with nginx as the origin (index source and web seed)."""
    from catalogue.keys import generate_key

    lab = Lab(tmp_path)
    for sub in ("images", "torrents"):
        (lab.cat_dir / sub).mkdir(parents=True)
    generate_key(lab.key, PASSPHRASE)
    nginx = Nginx(lab.cat_dir, tmp_path / "nginx", NginxLimits(header_timeout=1))
    lab.url = nginx.url
    try:
        yield lab, nginx
    finally:
        lab.stop()
        nginx.stop()


def test_imgdist_pulls_index_torrent_and_pieces_through_nginx(nginx_lab):
    lab, nginx = nginx_lab
    entry = lab.add_image("sage", "1.0", 40)  # past libtorrent's 16 MiB per web seed request
    lab.sign()
    a = lab.host("a", approve=("sage@1.0",), tracker=False)  # no tracker, no peers: the web seed only
    r = lab.run(a, "--sync")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "web seed" in r.stderr
    assert_installed(a, entry)
    log = nginx.access_log()
    answered = {(m, uri, status) for m, uri, status, *_ in log}
    assert {("GET", "/index.yaml", "200"), ("GET", "/index.yaml.sig", "200"),
            ("GET", "/" + entry.torrent, "200")} <= answered, log
    pieces = [line for line in log if line[1] == "/images/" + entry.file_name]
    assert pieces and all(status == "206" and rng.startswith('"bytes=') for _, _, status, rng, *_ in pieces), pieces
    # Keep-alive: the web seed's range requests share connections.
    assert max(int(line[5]) for line in pieces) > 1, pieces


def test_nginx_publishes_only_the_catalogue_paths_with_ranges(nginx_lab):
    lab, nginx = nginx_lab
    lab.add_image("sage", "1.0", 1)
    lab.sign()
    (lab.cat_dir / "catalogue.yaml").write_text("secret: 1\n")
    (lab.cat_dir / "images" / ".hidden").write_bytes(b"secret")
    (lab.cat_dir / "images" / "passwd.qcow2").symlink_to("/etc/passwd")
    for path in ("catalogue.yaml", "images/../catalogue.yaml", "images/%2e%2e/catalogue.yaml",
                 "images/..%2fcatalogue.yaml", "torrents/", "images/", "images/.hidden", "../../etc/passwd",
                 "index.yaml/", "images/passwd.qcow2", "images/sage-1.0.qcow2%0A"):
        status, _, body = get(nginx.url + path)
        assert status in (400, 403, 404) and b"secret" not in body and b"root:" not in body, (path, status)
    image = (lab.cat_dir / "images" / "sage-1.0.qcow2").read_bytes()
    url = nginx.url + "images/sage-1.0.qcow2"
    status, h, body = get(url, {"Range": "bytes=100-1123"})
    assert status == 206 and body == image[100:1124] and h["content-range"] == f"bytes 100-1123/{len(image)}"
    status, h, _ = get(url, {"Range": f"bytes={len(image)}-"})
    assert status == 416
    status, _, body = get(url, {"Range": "bytes=0-1,5-6"})  # more than one range: the whole file
    assert status == 200 and body == image
    status, h, _ = get(nginx.url + "index.yaml")
    assert status == 200 and h["cache-control"] == "no-cache" and h["content-type"] == "application/yaml"


def test_nginx_cuts_off_half_open_requests(nginx_lab):
    lab, nginx = nginx_lab
    lab.sign()
    held = [socket.create_connection(("127.0.0.1", nginx.port), timeout=10) for _ in range(20)]
    try:
        for s in held:
            s.sendall(b"GET /index.yaml HTT")
        assert get(nginx.url + "index.yaml")[0] == 200
        wait_for(lambda: all(closed_by_server(s) for s in held), 20, "nginx closing the half-open requests",
                 interval=0.05)
    finally:
        for s in held:
            s.close()


def test_nginx_conf_prints_the_block_and_refuses_a_path_nginx_would_misread(signed_catalogue, cli, tmp_path):
    root = signed_catalogue.cat.root
    r = cli("catalogue", "nginx-conf", "--dir", str(root), "--listen", "0.0.0.0:8765")
    assert r.returncode == 0, r.stderr
    assert r.stdout == site_config(root.resolve(), "0.0.0.0:8765")
    assert f"root {root.resolve()};" in r.stdout and "listen 0.0.0.0:8765;" in r.stdout
    odd = tmp_path / "cat$host;x"
    shutil.copytree(root, odd)
    r = cli("catalogue", "nginx-conf", "--dir", str(odd))
    assert r.returncode == 78 and "--dir" in r.stderr and "nginx would read" in r.stderr, r.stderr
    r = cli("catalogue", "nginx-conf", "--dir", str(root), "--listen", "8765; include /etc/passwd")
    assert r.returncode == 78 and "--listen" in r.stderr, r.stderr
