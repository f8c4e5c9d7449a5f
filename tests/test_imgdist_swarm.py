"""imgdist with real libtorrent sessions on loopback: origin + hosts, bans, resume, fallback."""
from __future__ import annotations

import hashlib
import os
import signal
import stat
import time
from pathlib import Path


from catalogue.hashcache import cached_sha256
from catalogue.trust import hash_cache_path
from cluster.spec import load_spec

MiB = 1 << 20


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def store_of(spec: Path) -> Path:
    return Path(load_spec(spec).store)


def assert_installed(spec: Path, entry) -> Path:
    path = store_of(spec) / "images" / "base" / entry.file_name
    assert path.is_file(), f"{path} not installed"
    assert sha256(path) == entry.sha256
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert not list((store_of(spec) / "images" / "partial").iterdir())
    # The digest checked at install is the pre-boot check's cache entry: the first boot won't re-hash.
    assert cached_sha256(hash_cache_path(load_spec(spec)), path, path.stat()) == entry.sha256
    return path


def test_origin_and_three_hosts_pull_one_image_and_all_verify(imgdist_lab):
    entry = imgdist_lab.add_image("sage", "1.0", 24, roles=("sage",))
    imgdist_lab.sign()
    imgdist_lab.start_origin()
    # The site's host list: each host starts on its own third of the pieces (steering).
    hosts = [imgdist_lab.host(f"h{i}", approve=("sage@1.0",),
                              extra=f"hypervisor: {{advertise_host: h{i}, hosts: [h0, h1, h2]}}\n")
             for i in range(3)]
    procs = [imgdist_lab.spawn(h, "--sync") for h in hosts]
    for i, (h, p) in enumerate(zip(hosts, procs)):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-3000:]
        assert "installed sage@1.0" in out.decode()
        assert f"(host {i + 1} of 3)" in err.decode()
        assert_installed(h, entry)
    listing = imgdist_lab.run(hosts[0], "--list")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("sage "))
    assert row.split()[1:3] == ["1.0", "24"] or "1.0" in row
    assert "verified" in row and " yes " in row


def test_second_sync_is_a_no_op(imgdist_lab):
    imgdist_lab.add_image("sage", "1.0", 8)
    imgdist_lab.sign()
    imgdist_lab.start_origin()
    h = imgdist_lab.host("h0", approve=("sage@*",))
    assert imgdist_lab.run(h, "--sync").returncode == 0
    again = imgdist_lab.run(h, "--sync")
    assert again.returncode == 0, again.stderr
    assert "present   sage@1.0" in again.stdout


def test_host_serving_corrupt_pieces_is_banned_and_the_others_finish_correct(imgdist_lab, tmp_path):
    from tests.fixtures.imgdist_lab import BadSeeder

    entry = imgdist_lab.add_image("sage", "1.0", 24)
    imgdist_lab.sign()
    # A slow origin, so the hosts take much of the image from the fast, lying peer.
    imgdist_lab.start_origin(upload_rate=3 * MiB)
    cat_image = imgdist_lab.cat_dir / "images" / entry.file_name
    meta = (imgdist_lab.cat_dir / entry.torrent).read_bytes()
    bad = BadSeeder(meta, cat_image, tmp_path / "bad", corrupt_every=4)
    try:
        hosts = [imgdist_lab.host(f"h{i}", approve=("sage@1.0",), peers=(f"{bad.ip}:{bad.port}",))
                 for i in range(3)]
        procs = [imgdist_lab.spawn(h, "--sync") for h in hosts]
        logs = []
        for h, p in zip(hosts, procs):
            out, err = p.communicate(timeout=180)
            logs.append(err.decode())
            assert p.returncode == 0, logs[-1][-3000:]
            assert_installed(h, entry)
        assert bad.uploaded() > 0, "the bad peer never served anything: the test proves nothing"
    finally:
        bad.stop()
    banned = [log for log in logs if f"banned peer {bad.ip}:" in log]
    assert banned, "no host banned the peer that served corrupt pieces:\n" + logs[0][-3000:]
    assert all("failed its hash check" in log for log in banned)


def test_lone_bad_source_falls_back_to_the_web_seed(imgdist_lab, tmp_path):
    from tests.fixtures.imgdist_lab import BadSeeder

    entry = imgdist_lab.add_image("sage", "1.0", 8)
    imgdist_lab.sign()
    meta = (imgdist_lab.cat_dir / entry.torrent).read_bytes()
    bad = BadSeeder(meta, imgdist_lab.cat_dir / "images" / entry.file_name, tmp_path / "bad", corrupt_every=1)
    try:
        # No origin seeder, no tracker: the only peer lies about every piece.
        h = imgdist_lab.host("h0", approve=("sage@1.0",), tracker=False, stall=4,
                             peers=(f"{bad.ip}:{bad.port}",))
        r = imgdist_lab.run(h, "--sync", timeout=120)
    finally:
        bad.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"banned peer {bad.ip}:" in r.stderr
    assert "using the web seed" in r.stderr
    assert_installed(h, entry)


def _wait_for_progress(spec: Path, key: str, percent: float, proc, timeout: float = 90) -> float:
    from imagedist.state import read_status
    from cluster.store import Store

    store = Store(store_of(spec))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = read_status(store)
        img = st.images.get(key) if st else None
        if img and img.percent >= percent and store.resume_file(key).exists():
            return img.percent
        assert proc.poll() is None, "the pull ended before it could be killed"
        time.sleep(0.2)
    raise AssertionError(f"{key} never reached {percent}%")


def test_sigkilled_pull_resumes_where_it_left_off(imgdist_lab):
    import re

    entry = imgdist_lab.add_image("sage", "1.0", 32)
    imgdist_lab.sign()
    # Slow enough that a resume save (every swarm.RESUME_EVERY s) falls well before the kill.
    imgdist_lab.start_origin(upload_rate=2 * MiB)
    h = imgdist_lab.host("h0", approve=("sage@1.0",))
    p = imgdist_lab.spawn(h, "--sync")
    reached = _wait_for_progress(h, "sage-1.0", 60.0, p)
    listing = imgdist_lab.run(h, "--list").stdout
    assert "downloading" in next(line for line in listing.splitlines() if line.startswith("sage "))
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    partial = store_of(h) / "images" / "partial" / entry.file_name
    assert partial.exists() and not (store_of(h) / "images" / "base" / entry.file_name).exists()
    r = imgdist_lab.run(h, "--sync", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from saved state" in r.stderr
    m = re.search(r"installed \(.*?(\d+) MiB fetched, (\d+) MiB resumed", r.stderr)
    assert m, r.stderr[-2000:]
    fetched, resumed = int(m.group(1)), int(m.group(2))
    # What was flushed before the kill is kept (up to max_queued_disk_bytes may have been only in
    # memory); only the rest is fetched again.
    assert resumed >= 4, (reached, fetched, resumed)
    assert fetched <= 32 - resumed + 2, (reached, fetched, resumed)
    assert_installed(h, entry)


def test_daemon_pulls_on_sighup_seeds_to_a_peer_and_stops_cleanly(imgdist_lab):
    from catalogue.approvals import approve

    entry = imgdist_lab.add_image("sage", "1.0", 8)
    imgdist_lab.sign()
    a = imgdist_lab.host("a", tracker=False)
    daemon = imgdist_lab.spawn(a, "--daemon", "--interval", "3600", log=a.parent / "daemon.log")
    status = store_of(a) / "state" / "imgdist-status.json"
    deadline = time.monotonic() + 60
    while not status.exists():
        assert daemon.poll() is None and time.monotonic() < deadline, (a.parent / "daemon.log").read_text()
        time.sleep(0.2)
    assert not (store_of(a) / "images" / "base" / entry.file_name).exists()  # not approved yet
    approve(load_spec(a), "sage@1.0")
    daemon.send_signal(signal.SIGHUP)
    installed = store_of(a) / "images" / "base" / entry.file_name
    deadline = time.monotonic() + 60
    while not installed.exists():
        assert daemon.poll() is None and time.monotonic() < deadline, (a.parent / "daemon.log").read_text()
        time.sleep(0.2)
    # B knows only A: the image must come from A's seeding, not from the web seed.
    b = imgdist_lab.host("b", approve=("sage@1.0",), tracker=False,
                         peers=(f"127.0.0.1:{load_spec(a).imgdist.listen_port}",))
    r = imgdist_lab.run(b, "--sync")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "web seed" not in r.stderr
    assert_installed(b, entry)
    # Disabled, A stops seeding at once: C, which knows only A, has to fall back to the web seed.
    assert imgdist_lab.run(a, "--disable").returncode == 0
    time.sleep(3)
    c = imgdist_lab.host("c", approve=("sage@1.0",), tracker=False, stall=3,
                         peers=(f"127.0.0.1:{load_spec(a).imgdist.listen_port}",))
    r = imgdist_lab.run(c, "--sync")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "using the web seed" in r.stderr
    assert_installed(c, entry)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0


def _origin_in_this_process(imgdist_lab, rate: int, extra: str = "", hosts_only: bool = False):
    """The origin on 127.0.0.1 in a thread of the test, so its pacer and counters can be read;
    returns it, the event that stops it and its thread."""
    import threading

    from imagedist.origin import Origin
    from tests.fixtures.imgdist_lab import free_port

    imgdist_lab.tracker_port, imgdist_lab.origin_bt_port = free_port(), free_port()
    ospec = imgdist_lab.root / "origin.yaml"
    text = imgdist_lab.spec_text(imgdist_lab.root / "ostore", imgdist_lab.origin_bt_port,
                                 upload_rate=rate, extra=extra)
    ospec.write_text(text.replace("imgdist: {", "imgdist: {tracker_hosts_only: true, ") if hosts_only else text)
    origin = Origin(load_spec(ospec), imgdist_lab.cat_dir, imgdist_lab.tracker_port, bind="127.0.0.1")
    stop = threading.Event()
    runner = threading.Thread(target=origin.run, args=(stop.is_set,), daemon=True)
    runner.start()
    return origin, stop, runner


def test_origin_paces_each_host_by_what_it_still_lacks_of_its_stripe(imgdist_lab):
    """Real origin (in this process, to read its pacer) and two hosts on their own loopback
    addresses: the hosts name their stripes in the announce, and the one that starts later (so
    lacks more of its stripe) gets the larger share of the origin's rate."""
    from imagedist.steering import Stripe

    entry = imgdist_lab.add_image("sage", "1.0", 16)
    imgdist_lab.sign()
    rate = 2 * MiB
    origin, stop, runner = _origin_in_this_process(imgdist_lab, rate)
    ips = ["127.0.0.2", "127.0.0.3"]
    hosts = [imgdist_lab.host(f"p{i}", approve=("sage@1.0",), listen_ip=ip,
                              extra=f"hypervisor: {{advertise_host: '{ip}', hosts: {ips}}}\n")
             for i, ip in enumerate(ips)]
    samples: list[dict[str, int]] = []
    stripes: set[tuple[str, Stripe | None]] = set()
    try:
        first = imgdist_lab.spawn(hosts[0], "--sync")
        # Started once the first host pulls, not later: a host that has its stripe stops taking
        # from the origin (gated), and waiting for a resume file (_wait_for_progress) was often that.
        deadline = time.monotonic() + 60
        while not any(p.ip[0] == ips[0] for h in origin.swarm.session.get_torrents() for p in h.get_peer_info()):
            assert first.poll() is None and time.monotonic() < deadline, "the first host never connected"
            time.sleep(0.1)
        second = imgdist_lab.spawn(hosts[1], "--sync")
        while first.poll() is None or second.poll() is None:
            samples.append(origin.pacer.limits())
            stripes.update((ip, origin.table.stripe_of(ip)) for ip in ips)
            time.sleep(0.1)
        assert first.returncode == 0 and second.returncode == 0, first.stdout.read()[-2000:]
    finally:
        stop.set()
        runner.join(timeout=30)
    for h in hosts:
        assert_installed(h, entry)
    # Each host's announce named its stripe (a host that is done announces "stopped": forgotten).
    assert {(ips[0], Stripe(0, 2)), (ips[1], Stripe(1, 2))} <= stripes, stripes
    both = [s for s in samples if s.get(ips[0], rate) < rate and s.get(ips[1], rate) < rate]
    assert both, f"the origin never paced both hosts at once: {samples}"
    assert any(s[ips[1]] > s[ips[0]] for s in both), both
    assert all(s[ips[0]] + s[ips[1]] <= rate + 16 << 10 for s in both), both


def test_origin_sends_each_piece_about_once_to_steered_hosts(imgdist_lab):
    """Real origin (in this process, to read what it uploaded) and three steered hosts on their own
    loopback addresses, started together: a host asks the origin only for its own slice and for
    nothing another host is still fetching from it, so the origin sends about one copy."""
    from imagedist.steering import Stripe

    entry = imgdist_lab.add_image("sage", "1.0", 32)
    imgdist_lab.sign()
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    # The origin knows the site's hosts too: it places them by address (and admits only them).
    listed = ", ".join(f"{{name: q{i}, address: '{ip}'}}" for i, ip in enumerate(ips))
    origin, stop, runner = _origin_in_this_process(
        imgdist_lab, 4 * MiB, f"hypervisor: {{hosts: [{listed}]}}\n", hosts_only=True)
    assert origin.table.site.only
    assert origin.table.stripes_by_ip() == {ip: Stripe(i, 3) for i, ip in enumerate(ips)}
    hosts = [imgdist_lab.host(f"q{i}", approve=("sage@1.0",), listen_ip=ip,
                              extra=f"hypervisor: {{advertise_host: '{ip}', hosts: {ips}}}\n")
             for i, ip in enumerate(ips)]
    try:
        procs = [imgdist_lab.spawn(h, "--sync") for h in hosts]
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err.decode()[-3000:]
        sent = origin.uploaded()
    finally:
        stop.set()
        runner.join(timeout=30)
    for h in hosts:
        assert_installed(h, entry)
    # About once: 1.00-1.03 on a quiet machine, 1.035 seen with the rest of the suite on both cores
    # (a piece re-requested after a timeout); 1.10 is the bound at site scale.
    assert entry.size <= sent <= 1.10 * entry.size, f"origin sent {sent / entry.size:.3f} copies"
    assert set(origin.pacer.hosts) == set(ips)  # each announced from its own address, admitted
