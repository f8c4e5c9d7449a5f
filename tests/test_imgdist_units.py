"""imgdist's pure parts: steering stripes, the tracker's peer table, version ordering, classad names."""
from __future__ import annotations

import time
import urllib.request
from urllib.parse import quote_from_bytes

import libtorrent as lt
import pytest

from imagedist import steering
from imagedist.classad import attr_suffix
from imagedist.gc import version_key
from imagedist.tracker import PEER_TTL, PeerTable, Tracker
from tests.http_burst import statuses_of_a_burst


@pytest.mark.parametrize("pieces,count", [(513, 8), (7, 3), (1024, 5)])
def test_stripes_cover_every_piece_exactly_once(pieces, count):
    seen = []
    for i in range(count):
        seen += list(steering.Stripe(i, count).pieces(pieces))
    assert seen == list(range(pieces))
    prio = steering.stripe_priorities(pieces, steering.Stripe(1, count))
    own = steering.Stripe(1, count).pieces(pieces)
    assert all(prio[p] == steering.OWN_PRIORITY for p in own)
    assert prio.count(steering.OTHER_PRIORITY) == pieces - len(own)


def test_another_slices_piece_is_wanted_only_once_a_peer_holds_it():
    stripe = steering.Stripe(0, 2)  # pieces 0-2 of 6
    # Connected: the origin (a seed: every piece) and one peer holding pieces 3 and 4.
    prio = steering.steered_priorities([1, 1, 1, 2, 2, 1], origins=1, stripe=stripe)
    assert prio == [steering.OWN_PRIORITY] * 3 + [steering.OTHER_PRIORITY] * 2 + [0]
    # Without the origin connected (not yet, or gated), availability is the peers' alone.
    prio = steering.steered_priorities([0, 0, 0, 1, 0, 0], origins=0, stripe=stripe)
    assert prio == [steering.OWN_PRIORITY] * 3 + [steering.OTHER_PRIORITY, 0, 0]


def test_loopback_origin_counts_only_for_a_host_with_an_address_of_its_own(tmp_path):
    from cluster.spec import load_spec
    from imagedist.source import origin_ips

    def ips(listen_ip: str) -> frozenset[str]:
        spec = tmp_path / f"{listen_ip}.yaml"
        spec.write_text(f"store: {tmp_path / 'store'}\nroles: {{sage: {{image: sage@1, port: 6000}}}}\n"
                        "catalogue: {url: 'http://127.0.0.1:8000/'}\n"
                        f"imgdist: {{tracker: 'http://127.0.0.1:6969/announce', listen_ip: '{listen_ip}'}}\n")
        return origin_ips(load_spec(spec), ["http://127.0.0.1:8000/images/"])

    # Listening on every address, this host reaches its peers on one machine from 127.0.0.1 too.
    assert ips("0.0.0.0") == frozenset()
    assert ips("127.0.0.2") == {"127.0.0.1"}
    assert ips("127.0.0.1") == frozenset()  # the origin's address is this host's own


def test_stripe_for_needs_the_host_in_a_list_of_two_or_more():
    assert steering.stripe_for("hv2", ["hv1", "hv2", "hv3"]) == steering.Stripe(1, 3)
    assert steering.stripe_for("hv9", ["hv1", "hv2"]) is None
    assert steering.stripe_for("hv1", ["hv1"]) is None
    have = [False] * 10
    for p in steering.Stripe(0, 2).pieces(10):
        have[p] = True
    assert steering.slice_complete(have, steering.Stripe(0, 2))
    assert not steering.slice_complete(have, steering.Stripe(1, 2))


def test_pacing_splits_the_origin_rate_by_what_each_host_lacks_of_its_stripe():
    even = steering.pacing_limits(12_000_000, [(f"10.0.0.{i}", 10) for i in range(8)])
    assert even == {f"10.0.0.{i}": 1_500_000 for i in range(8)}
    # A host 3x behind gets 3x the share; one with its slice complete only a trickle.
    uneven = steering.pacing_limits(12_000_000, [("10.0.0.1", 30), ("10.0.0.2", 10), ("10.0.0.3", 0)])
    assert uneven == {"10.0.0.1": 9_000_000, "10.0.0.2": 3_000_000, "10.0.0.3": steering.MIN_PACE}
    # Unsteered hosts weigh as much as the average steered one; hosts on one IP add up.
    mixed = steering.pacing_limits(10_000_000, [("10.0.0.1", 20), ("10.0.0.2", None), ("10.0.0.2", 20)])
    assert mixed == {"10.0.0.1": 3_333_333, "10.0.0.2": 6_666_666}
    # Every slice done (or nobody steered): an even split.
    assert steering.pacing_limits(8_000_000, [("a", 0), ("b", 0)]) == {"a": 4_000_000, "b": 4_000_000}
    assert steering.pacing_limits(8_000_000, [("a", None), ("b", None)]) == {"a": 4_000_000, "b": 4_000_000}
    assert steering.pacing_limits(0, [("a", 5)]) == {}


def test_stripe_travels_as_an_announce_parameter():
    s = steering.Stripe(3, 8)
    assert steering.parse_stripe(steering.stripe_param(s)) == s
    assert steering.parse_stripe("9/8") is None and steering.parse_stripe("x") is None
    assert steering.missing_in_stripe([True, False, False, True], steering.Stripe(0, 2)) == 1


def test_peer_table_lists_others_forgets_stopped_and_stale_and_refuses_unknown_hashes():
    ih = b"\x01" * 20
    t = PeerTable()
    t.allow([ih])
    now = time.time()
    assert t.announce(b"\x02" * 20, ("10.0.0.1", 1), False, now) is None
    assert t.announce(ih, ("10.0.0.1", 6881), False, now) == []
    assert t.announce(ih, ("10.0.0.2", 6881), False, now) == [("10.0.0.1", 6881)]
    assert t.announce(ih, ("10.0.0.1", 6881), True, now) == [("10.0.0.2", 6881)]
    assert t.announce(ih, ("10.0.0.3", 6881), False, now + PEER_TTL + 1) == []


def test_peer_table_forgets_the_stripe_of_a_host_that_stopped_announcing():
    """A dead host's stripe expires with its peer entry, so the pacer stops reserving it a share."""
    ih = b"\x01" * 20
    t = PeerTable()
    t.allow([ih])
    now = time.time()
    for ep, stripe in ((("10.0.0.1", 6881), steering.Stripe(0, 2)), (("10.0.0.2", 6881), steering.Stripe(1, 2))):
        t.announce(ih, ep, False, now)
        t.note_stripe(ep, stripe)
    t.announce(ih, ("10.0.0.2", 6881), False, now + PEER_TTL)  # still announcing
    assert t.stripes_by_ip(now + PEER_TTL - 1) == {"10.0.0.1": steering.Stripe(0, 2),
                                                   "10.0.0.2": steering.Stripe(1, 2)}
    assert t.stripes_by_ip(now + PEER_TTL + 1) == {"10.0.0.2": steering.Stripe(1, 2)}
    t.note_stripe(("10.0.0.2", 6881), None)  # "stopped"
    assert t.stripe_of("10.0.0.2", now + PEER_TTL + 2) is None


def test_tracker_queues_a_whole_sites_simultaneous_announces():
    """A site's hosts announce together after a reload: all 32 connect before the tracker accepts
    one (socketserver's backlog of 5 dropped the 7th SYN, a 1 s retry), and each is answered."""
    ih = b"\xab" * 20
    table = PeerTable()
    table.allow([ih])
    tracker = Tracker("127.0.0.1", 0, table, origin_port=6881)
    announces = [f"GET /announce?info_hash={quote_from_bytes(ih)}&peer_id=-XX0000-{i:012d}"
                 f"&port={7000 + i}&left=1&compact=1 HTTP/1.0\r\n\r\n".encode() for i in range(32)]
    try:
        assert statuses_of_a_burst(tracker.port, announces, tracker.start) == [200] * 32
    finally:
        tracker.stop()


def test_tracker_answers_a_bencoded_compact_announce_with_the_origin_first():
    ih = b"\xab" * 20
    table = PeerTable()
    table.allow([ih])
    table.announce(ih, ("127.0.0.1", 7001), False, time.time())
    tracker = Tracker("127.0.0.1", 0, table, origin_port=6881).start()
    try:
        url = (f"http://127.0.0.1:{tracker.port}/announce?info_hash={quote_from_bytes(ih)}"
               "&peer_id=-XX0000-000000000000&port=7002&uploaded=0&downloaded=0&left=1&compact=1")
        reply = lt.bdecode(urllib.request.urlopen(url, timeout=10).read())
        peers = reply[b"peers"]
        got = [(".".join(str(b) for b in peers[i:i + 4]), int.from_bytes(peers[i + 4:i + 6], "big"))
               for i in range(0, len(peers), 6)]
        assert got == [("127.0.0.1", 6881), ("127.0.0.1", 7001)]
        assert table.stripe_of("127.0.0.1") is None
        urllib.request.urlopen(url + "&stripe=2/8", timeout=10).read()
        assert table.stripe_of("127.0.0.1") == steering.Stripe(2, 8)
        # Two hosts on one IP with different stripes: the origin can't tell them apart.
        urllib.request.urlopen(url.replace("port=7002", "port=7003") + "&stripe=3/8", timeout=10).read()
        assert table.stripe_of("127.0.0.1") is None
        bad = url.replace(quote_from_bytes(ih), quote_from_bytes(b"\x00" * 20))
        assert b"failure reason" in urllib.request.urlopen(bad, timeout=10).read()
    finally:
        tracker.stop()


def test_versions_order_numerically_and_names_become_classad_attributes():
    assert sorted(["1.10", "1.9", "1.2"], key=version_key) == ["1.2", "1.9", "1.10"]
    assert attr_suffix("sage-ubuntu.22+x") == "sage_ubuntu_22_x"


def test_the_origins_send_log_tells_repeats_to_the_stripe_owner_from_repeats_to_others():
    from imagedist.sendlog import SendLog
    from imagedist.steering import Stripe

    log = SendLog()
    stripes = {"10.0.0.1": Stripe(0, 2), "10.0.0.2": Stripe(1, 2)}  # 4 pieces: 0-1 and 2-3
    for t, (piece, ip) in enumerate([(0, "10.0.0.1"), (1, "10.0.0.1"), (2, "10.0.0.2"), (3, "10.0.0.2"),
                                     (0, "10.0.0.1"), (2, "10.0.0.1")]):
        log.record(piece, 0, ip, float(t))
    line = log.summary(4, stripes.get)
    assert line == ("sent 6 blocks, 4 distinct; 2 repeats (0.500 of the image): 1 to the piece's stripe owner, "
                    "1 to other hosts; 1 in the last tenth of the run")
    assert SendLog().summary(4, stripes.get) == "sent no blocks"
