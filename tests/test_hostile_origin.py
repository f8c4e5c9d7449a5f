"""A hostile or broken origin against the host side: real servers on loopback that drip bytes,
send a bad status line or an endless one, or cut the body short. Every such fetch ends in time as
a TempFailure (75), and `imgdist --daemon` keeps seeding through the failed passes. A torrent name
from the index that would leave the origin is refused unfetched (65)."""
from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import pytest

from catalogue.fetch import FetchLimits, fetch_bytes
from cluster.errors import DataError, TempFailure
from cluster.spec import load_spec
from imagedist.source import fetch_torrent
from tests.hostile_http import DRIP_SECONDS, HostileOrigin
from tests.polling import wait_for
from tests.test_imgdist_swarm import assert_installed

QUICK = FetchLimits(timeout=5, deadline=1.5)


@pytest.mark.parametrize("mode, says", [
    ("bad-status", "BadStatusLine"),
    ("long-line", "LineTooLong"),
    ("truncated", "the connection ended after"),
    ("drip", "not fetched within 1.5 s"),
    ("drip-headers", "not fetched within 1.5 s"),
])
def test_every_hostile_answer_is_a_temporary_failure_in_time(signed_catalogue, mode, says):
    with HostileOrigin(signed_catalogue.cat.root, [mode]) as origin:
        started = time.monotonic()
        with pytest.raises(TempFailure) as err:
            fetch_bytes(origin.url + "index.yaml", 1 << 20, QUICK)
        took = time.monotonic() - started
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert origin.served == [(mode, "/index.yaml")]
    assert took < DRIP_SECONDS / 4, f"the fetch lasted {took:.1f} s"  # ended, not dripped to the end


def test_a_body_slower_than_the_minimum_rate_is_given_up(signed_catalogue):
    """The deadline is far off (60 s); the body arriving at 20 bytes/s is given up once the grace
    period has passed."""
    limits = FetchLimits(timeout=5, deadline=DRIP_SECONDS, min_rate=1000, grace=0.5)
    with HostileOrigin(signed_catalogue.cat.root, ["drip"]) as origin:
        with pytest.raises(TempFailure, match="slower than the minimum of 1000 bytes/s"):
            fetch_bytes(origin.url + "index.yaml", 1 << 20, limits)


def test_a_well_behaved_answer_is_fetched_whole(signed_catalogue):
    with HostileOrigin(signed_catalogue.cat.root, ["ok"]) as origin:
        assert fetch_bytes(origin.url + "index.yaml", 1 << 20, QUICK) == signed_catalogue.cat.index_path.read_bytes()


@pytest.mark.parametrize("mode", ["truncated", "bad-status"])
def test_accept_from_a_broken_origin_is_transient_not_a_forged_signature(signed_catalogue, cli, mode):
    """A truncated index used to fail its signature check (65, "forged"); the bytes never arrived,
    so it is a network failure (75) and the next try may well succeed."""
    with HostileOrigin(signed_catalogue.cat.root, [mode]) as origin:
        r = cli("catalogue", "accept", "--spec", str(signed_catalogue.spec_path), "--url", origin.url)
    assert r.returncode == 75, r.stderr
    assert "Traceback" not in r.stderr and "signature" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_daemon_keeps_seeding_through_passes_a_broken_origin_fails(imgdist_lab):
    """A installs the image, then its origin turns hostile: every pass's index fetch fails in
    another way. The daemon logs each failure, stays up, and B (which knows only A) still gets
    the image from A."""
    entry = imgdist_lab.add_image("sage", "1.0", 8)
    imgdist_lab.sign()
    a = imgdist_lab.host("a", approve=("sage@1.0",), tracker=False)
    r = imgdist_lab.run(a, "--sync")
    assert r.returncode == 0, r.stderr[-3000:]
    modes = ["bad-status", "long-line", "truncated"]
    with HostileOrigin(imgdist_lab.cat_dir, modes) as origin:
        a.write_text(a.read_text().replace(imgdist_lab.url, origin.url))
        log = a.parent / "daemon.log"
        daemon = imgdist_lab.spawn(a, "--daemon", "--interval", "1", log=log)
        wait_for(lambda: len(origin.served) >= 2 * len(modes) or daemon.poll() is not None, 90,
                 "six passes against the hostile origin")
        assert daemon.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        for why in ("BadStatusLine", "LineTooLong", "the connection ended after"):
            assert f"sync pass failed: {origin.url}index.yaml" in text and why in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        b = imgdist_lab.host("b", approve=("sage@1.0",), tracker=False,
                             peers=(f"127.0.0.1:{load_spec(a).imgdist.listen_port}",))
        r = imgdist_lab.run(b, "--sync")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "web seed" not in r.stderr  # from A's seeding, not the origin
        assert_installed(b, entry)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0


@pytest.mark.parametrize("torrent", [
    "torrents/../index.yaml", "torrents/..%2findex.yaml", "http://elsewhere.example/x.torrent",
    "torrents//elsewhere.example/x.torrent", "torrents/x.torrent?y=1", "torrents/x.torrent#y",
    "torrents\\..\\x.torrent", "torrents/..", "images/x.torrent", "torrents/a..b.torrent",
])
def test_a_torrent_name_that_leaves_the_origin_is_refused_unfetched(signed_catalogue, torrent):
    """The index's names are signed but served by the origin or a peer: whatever the index model
    let through, the torrent's URL is one plain name under the origin's torrents/, or nothing."""
    with HostileOrigin(signed_catalogue.cat.root, ["ok"]) as origin:
        signed_catalogue.write_spec(f"  url: {origin.url}\n")
        entry = SimpleNamespace(name="demo", version="1", torrent=torrent)
        with pytest.raises(DataError) as err:
            fetch_torrent(signed_catalogue.spec(), entry)
    assert str(err.value).startswith("torrent ") and "\n" not in str(err.value), str(err.value)
    assert err.value.exit_code == 65 and origin.served == []


def test_a_signed_index_naming_a_torrent_with_dot_dot_is_refused_by_sync(imgdist_lab):
    """End to end: the index model admits 'torrents/NAME..torrent' (one segment); `imgdist --sync`
    refuses to fetch it (the image fails with that line: sync's exit 1, as for a torrent whose hash
    does not match) and asks the origin for no torrent."""
    from catalogue.endorse import CatalogueDir

    imgdist_lab.add_image("sage", "1.0", 1)
    cat = CatalogueDir(imgdist_lab.cat_dir)
    entries, revoked = cat.draft()
    entries[0].torrent = "torrents/sage..1.0.torrent"
    cat.save_draft(entries, revoked)
    imgdist_lab.sign()
    a = imgdist_lab.host("a", approve=("sage@1.0",), tracker=False)
    with HostileOrigin(imgdist_lab.cat_dir, ["ok"]) as origin:
        a.write_text(a.read_text().replace(imgdist_lab.url, origin.url))
        r = imgdist_lab.run(a, "--sync")
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].startswith("imgdist: sage@1.0: torrent 'torrents/sage..1.0.torrent': not a plain "
                                                "file name on the origin"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not [p for _, p in origin.served if "torrent" in p], origin.served
