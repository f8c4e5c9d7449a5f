"""The origin's tracker and pacer at site scale and among hostile peers: 40 hosts on their own
loopback addresses announce over HTTP to a real tracker wired to a real libtorrent session's pacer."""
from __future__ import annotations

import http.client
import logging
from pathlib import Path
from urllib.parse import quote_from_bytes

import libtorrent as lt

from cluster.spec import parse_spec
from imagedist import steering
from imagedist.origin import FIRST_CLASS_ID, HOST_TTL, LAST_CLASS_ID, Origin
from imagedist.tracker import MAX_PEERS, MAX_PORTS_PER_IP, PEER_TTL, PeerTable, SiteHosts, Tracker
from tests.fixtures.imgdist_lab import free_port

IH = b"\xcd" * 20
MiB = 1 << 20


def announce(tracker_port: int, src_ip: str, peer_port: int, extra: str = "", ih: bytes = IH) -> dict:
    """One announce over HTTP from `src_ip` (any 127.0.0.x is this machine's): the bdecoded reply."""
    conn = http.client.HTTPConnection("127.0.0.1", tracker_port, timeout=10, source_address=(src_ip, 0))
    try:
        conn.request("GET", f"/announce?info_hash={quote_from_bytes(ih)}&peer_id=-XX0000-000000000000"
                            f"&port={peer_port}&uploaded=0&downloaded=0&left=1&compact=1{extra}")
        resp = conn.getresponse()
        assert resp.status == 200
        return lt.bdecode(resp.read())
    finally:
        conn.close()


def peers_of(reply: dict) -> list[tuple[str, int]]:
    assert b"failure reason" not in reply, reply
    peers = reply[b"peers"]
    return [(".".join(str(b) for b in peers[i:i + 4]), int.from_bytes(peers[i + 4:i + 6], "big"))
            for i in range(0, len(peers), 6)]


def site_origin(tmp_path: Path, ips: list[str], rate: int) -> Origin:
    hosts = ", ".join(f"{{name: hv{i}, address: '{ip}'}}" for i, ip in enumerate(ips))
    spec = parse_spec(f"store: {tmp_path / 'store'}\nroles: {{sage: {{image: sage@1, port: 6000}}}}\n"
                      f"hypervisor: {{hosts: [{hosts}]}}\n"
                      f"imgdist: {{listen_ip: 127.0.0.1, listen_port: {free_port()}, "
                      f"origin_upload_rate: {rate}, tracker_hosts_only: true}}\n", tmp_path / "origin.yaml")
    (tmp_path / "catalogue").mkdir()
    origin = Origin(spec, tmp_path / "catalogue", 0, bind="127.0.0.1")
    origin.table.allow([IH])
    return origin


def test_origin_places_and_paces_40_hosts_and_drops_those_that_left(tmp_path):
    """Past the 28 peer classes libtorrent's filter can name every host is still answered and paced (classes shared
    evenly, each class limited to its hosts' shares); stripes come from the host list, not from the
    announce; an unlisted address is refused; hosts that left free their classes."""
    ips = [f"127.0.0.{10 + i}" for i in range(40)]
    rate = 40 * MiB
    origin = site_origin(tmp_path, ips, rate)
    clock = [1000.0]
    origin.pacer.clock = lambda: clock[0]
    origin.tracker.start()
    port = origin.tracker.port
    try:
        for i, ip in enumerate(ips):
            # Every host claims the whole torrent as its stripe: the origin takes no host's word.
            got = peers_of(announce(port, ip, 7000 + i, "&stripe=0/1"))
            assert got[0] == ("127.0.0.1", origin.swarm.session.listen_port())
            assert sorted(got[1:]) == sorted((ips[j], 7000 + j) for j in range(i))
        refused = announce(port, "127.0.0.99", 7099)
        assert b"not one of the site's hosts" in refused[b"failure reason"]
        assert origin.pacer.class_of("127.0.0.99") is None
        # Nor may it connect to the seeder: libtorrent's ip filter blocks all but the listed hosts.
        blocked = origin.swarm.session.get_ip_filter()
        assert blocked.access("127.0.0.99") == 1 and all(blocked.access(ip) == 0 for ip in ips)

        assert origin.table.stripes_by_ip() == {ip: steering.Stripe(i, 40) for i, ip in enumerate(ips)}
        classes = {ip: origin.pacer.class_of(ip) for ip in ips}
        assert all(c is not None and FIRST_CLASS_ID <= c <= LAST_CLASS_ID for c in classes.values()), classes
        assert len(set(classes[ip] for ip in ips[:28])) == 28  # one each while there are classes left
        sizes = [list(classes.values()).count(c) for c in set(classes.values())]
        assert len(sizes) == 28 and max(sizes) - min(sizes) <= 1, sizes

        # Every host lacks as much of its stripe: each class gets its hosts' shares, in libtorrent.
        origin.pacer.apply([(ip, 10) for ip in ips], set(ips))
        share = rate // 40
        assert origin.pacer.limits() == {ip: share for ip in ips}
        ses = origin.swarm.session
        for c in set(classes.values()):
            members = [ip for ip in ips if classes[ip] == c]
            assert ses.get_peer_class(c)["upload_limit"] == share * len(members)

        # Ten hosts keep announcing; the other thirty are gone: their classes are freed, and a
        # new host gets a class of its own again.
        clock[0] += HOST_TTL / 2
        for i, ip in enumerate(ips[:10]):
            peers_of(announce(port, ip, 7000 + i))
        clock[0] += HOST_TTL / 2 + 1
        origin.pacer.apply([], set())
        assert set(origin.pacer.limits()) == set(ips[:10])
        assert all(origin.pacer.class_of(ip) is None for ip in ips[10:])
        kept = {origin.pacer.class_of(ip) for ip in ips[:10]}
        assert len(kept) == 10
        peers_of(announce(port, ips[10], 7010))
        assert origin.pacer.class_of(ips[10]) not in kept | {None}
    finally:
        origin.tracker.stop()
        origin.swarm.close()


def test_a_failing_pacer_does_not_cost_a_host_its_answer(caplog):
    table = PeerTable()
    table.allow([IH])

    def boom(ip: str) -> None:
        raise OverflowError("bad numeric conversion: positive overflow")

    table.on_announce = boom
    tracker = Tracker("127.0.0.1", 0, table, origin_port=6881).start()
    try:
        with caplog.at_level(logging.WARNING, logger="imagedist.tracker"):
            assert peers_of(announce(tracker.port, "127.0.0.2", 7002)) == [("127.0.0.1", 6881)]
            assert peers_of(announce(tracker.port, "127.0.0.3", 7003)) == [("127.0.0.1", 6881), ("127.0.0.2", 7002)]
        assert "pacing 127.0.0.3 failed" in caplog.text
    finally:
        tracker.stop()


def test_200_fake_announces_from_one_ip_do_not_keep_real_hosts_out_of_peer_lists():
    """One machine announcing 200 ports before the real hosts (insertion order used to decide who
    was listed) holds at most MAX_PORTS_PER_IP places; every real host is told every other."""
    table = PeerTable()
    table.allow([IH])
    tracker = Tracker("127.0.0.1", 0, table, origin_port=6881).start()
    real = [f"127.0.0.{2 + i}" for i in range(10)]
    try:
        for i in range(200):
            peers_of(announce(tracker.port, "127.0.0.250", 20000 + i, "&stripe=0/1"))
        for i, ip in enumerate(real):
            peers_of(announce(tracker.port, ip, 7000 + i))
        # What the table holds of that machine is bounded too, its claimed stripes included.
        assert len(table.peers[IH]) == len(real) + MAX_PORTS_PER_IP
        assert len(table.peers[IH].claims) == MAX_PORTS_PER_IP
        for i, ip in enumerate(real):
            got = peers_of(announce(tracker.port, ip, 7000 + i))
            assert {(r, 7000 + j) for j, r in enumerate(real) if j != i} <= set(got), got
            fakes = [p for p in got if p[0] == "127.0.0.250"]
            assert len(fakes) <= MAX_PORTS_PER_IP
            assert {p[1] for p in fakes} <= set(range(20200 - MAX_PORTS_PER_IP, 20200))  # its newest
    finally:
        tracker.stop()


def test_peer_lists_are_random_samples_and_stale_peers_go_without_a_scan():
    table = PeerTable()
    table.allow([IH])
    now = 1000.0
    eps = [(f"10.0.{i // 250}.{1 + i % 250}", 6881) for i in range(300)]
    for ep in eps:
        listed = table.announce(IH, ep, False, now)
        assert listed is not None and len(listed) <= MAX_PEERS and ep not in listed
    # Sampled, not the first 200 announced: a few announces between them name every peer.
    seen: set[tuple[str, int]] = set()
    for _ in range(20):
        seen.update(table.announce(IH, eps[0], False, now))
    assert seen == set(eps[1:])
    # A stopped host leaves at once, the rest after PEER_TTL (popped from the stale end).
    assert eps[5] not in table.announce(IH, eps[5], True, now) + table.announce(IH, eps[6], False, now)
    assert eps[5] not in set().union(*(table.announce(IH, eps[0], False, now) for _ in range(20)))
    assert table.announce(IH, ("10.9.9.9", 1), False, now + PEER_TTL + 1) == []
    assert len(table.peers[IH]) == 1


def test_site_hosts_take_stripes_from_the_list_and_share_an_address_without_one(tmp_path):
    spec = parse_spec("roles: {sage: {image: sage@1, port: 6000}}\n"
                      "hypervisor: {hosts: [hv0, '10.0.0.1', {name: hv2, address: 10.0.0.2},"
                      " {name: hv3, address: 10.0.0.2}]}\n", tmp_path / "cluster.yaml")
    site = SiteHosts.from_spec(spec.hypervisor.hosts, only=True)
    # hv0 has no address (the origin can't place it); hv2 and hv3 share one machine's address.
    assert site.stripes == {"10.0.0.1": steering.Stripe(1, 4), "10.0.0.2": None}
    table = PeerTable(site=site)
    assert table.refusal("10.0.0.1") is None and table.refusal("10.0.0.3")
    table.note_stripe(("10.0.0.1", 6881), steering.Stripe(0, 1))
    assert table.stripe_of("10.0.0.1") == steering.Stripe(1, 4)
    assert spec.hypervisor.host_names == ["hv0", "10.0.0.1", "hv2", "hv3"]


def test_a_claimed_stripe_wins_at_most_an_even_share():
    rows = [("10.0.0.1", 1000), ("10.0.0.2", 100), ("10.0.0.3", None)]
    assert steering.cap_wants(rows, 900) == [("10.0.0.1", 300), ("10.0.0.2", 100), ("10.0.0.3", None)]
    assert steering.cap_wants(rows, 0) == rows
