"""`imgdist`: the hypervisor-side image puller (and, with --origin, the origin's seeder)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from cluster.errors import SalvusError, SpecError
from cluster.spec import ClusterSpec, load_spec
from imagedist.store import Store, store_lock

log = logging.getLogger("imgdist")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgdist", description=(
        "Pull approved images as a BitTorrent swarm, verify them, install them read-only into "
        "the store, seed them, and advertise them to the scheduler."))
    p.add_argument("--spec", metavar="FILE", help="cluster spec (default: ./cluster.yaml, then $SALVUS_SPEC)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    cmd = p.add_mutually_exclusive_group(required=True)
    cmd.add_argument("--list", action="store_true", help="one row per image: state, endorsed, approved, VMs")
    cmd.add_argument("--sync", action="store_true", help="one pass: fetch index, verify, pull what is missing, gc")
    cmd.add_argument("--daemon", action="store_true", help="a pass every --interval seconds; seeds in between")
    cmd.add_argument("--enable", action="store_true", help="take part in pulling and seeding (persisted)")
    cmd.add_argument("--disable", action="store_true", help="pull and seed nothing (persisted)")
    cmd.add_argument("--list_unknown_files", action="store_true", help="store files no accepted index explains")
    cmd.add_argument("--gc", action="store_true", help="remove unwanted images (never one a running VM uses)")
    cmd.add_argument("--classad", action="store_true", help="machine attributes for an HTCondor startd cron")
    cmd.add_argument("--slurm-features", action="store_true", help="the same facts as Slurm node features")
    cmd.add_argument("--origin", metavar="DIR", help="seed the catalogue directory DIR and run the tracker")
    p.add_argument("--interval", type=float, default=None, help="--daemon: seconds between passes")
    p.add_argument("--keep", type=int, default=None, help="--gc: versions of each image to keep (0 = all)")
    p.add_argument("--tracker-port", type=int, default=6969, help="--origin: the tracker's HTTP port")
    return p


def _index(spec: ClusterSpec):
    from catalogue.trust import accepted_index

    return accepted_index(spec)


def cmd_list(spec: ClusterSpec) -> int:
    from imagedist.listing import render, rows

    print(render(rows(spec, Store.of(spec), _index(spec))), end="")
    return 0


def cmd_sync(spec: ClusterSpec) -> int:
    from imagedist.sync import Agent

    agent = Agent(spec)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with store_lock(agent.store, wait=False):
        try:
            r = agent.sync_pass(should_stop=stop.is_set)
        finally:
            agent.close()
    if r.disabled:
        print("imgdist is disabled on this host: nothing pulled (imgdist --enable)")
        return 0
    for ref in r.installed:
        print(f"installed {ref}")
    for ref in r.present:
        print(f"present   {ref}")
    for ref, why in sorted(r.skipped.items()):
        print(f"skipped   {ref}: {why}")
    for path in r.removed:
        print(f"removed   {path}")
    for ref, why in sorted(r.failed.items()):
        print(f"imgdist: {ref}: {why}", file=sys.stderr)
    return 0 if r.ok else 1


def cmd_gc(spec: ClusterSpec, keep: int | None) -> int:
    from imagedist.gc import collect
    from imagedist.store import Busy

    store = Store.of(spec)
    keep = spec.imgdist.keep_versions if keep is None else keep
    if keep < 0:
        raise SpecError("--keep: expected 0 (keep all) or a positive number of versions")
    try:
        with store_lock(store, wait=False):
            r = collect(spec, store, _index(spec), keep=keep, partials=True)
    except Busy:
        # A running pass owns images/partial/; base images can still be collected safely.
        r = collect(spec, store, _index(spec), keep=keep, partials=False)
        r.notes.append("a sync or daemon is running: partial downloads left to it")
    for p in r.removed:
        print(f"removed {p}")
    for name in r.kept_in_use:
        print(f"kept    {name}: in use by a running VM")
    for n in r.notes:
        print(f"note    {n}")
    return 0


def cmd_origin(spec: ClusterSpec, directory: str, tracker_port: int) -> int:
    from imagedist.origin import Origin

    d = Path(directory)
    if not (d / "torrents").is_dir() or not (d / "images").is_dir():
        raise SpecError(f"{d}: expected a catalogue directory with images/ and torrents/")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Origin(spec, d, tracker_port).run(stop.is_set)
    return 0


def dispatch(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    store = Store.of(spec)
    if args.list:
        return cmd_list(spec)
    if args.sync:
        return cmd_sync(spec)
    if args.daemon:
        from imagedist.daemon import run_daemon

        return run_daemon(spec, args.interval or float(spec.imgdist.interval))
    if args.enable or args.disable:
        from imagedist.state import set_enabled

        set_enabled(store, bool(args.enable))
        print(f"imgdist {'enabled' if args.enable else 'disabled'} on this host ({store.runtime.imgdist_enabled})")
        return 0
    if args.list_unknown_files:
        from imagedist.gc import unknown_files

        for f in unknown_files(store, _index(spec)):
            print(f)
        return 0
    if args.gc:
        return cmd_gc(spec, args.keep)
    if args.classad:
        from imagedist.classad import render_classad

        print(render_classad(spec, store, _index(spec)), end="")
        return 0
    if args.slurm_features:
        from imagedist.classad import slurm_features

        print(",".join(slurm_features(spec, store, _index(spec))))
        return 0
    return cmd_origin(spec, args.origin, args.tracker_port)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=max(logging.INFO - 10 * args.verbose, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(dispatch(args) or 0)
    except SalvusError as e:
        print(f"imgdist: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
