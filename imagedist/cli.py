"""`imgdist`: the hypervisor-side image puller (and, with `imgdist origin`, the origin's seeder)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from cluster.cliframe import common_options, parse, run_command, setup_logging
from cluster.errors import SpecError
from cluster.spec import MAX_SECONDS, ClusterSpec, load_spec
from cluster.store import Store
from imagedist.store import store_lock

log = logging.getLogger("imgdist")


# The flag spellings imgdist had before it had subcommands; users and unit files ask for them by name
# (`imgdist --list` on a hypervisor), so each still means its subcommand.
FLAG_ALIASES = {"--sync": "sync", "--daemon": "daemon", "--list": "list", "--gc": "gc", "--enable": "enable",
                "--disable": "disable", "--list_unknown_files": "unknown-files", "--classad": "classad",
                "--slurm-features": "slurm-features", "--origin": "origin"}


def interval_seconds(text: str) -> float:
    """--interval: finite, above zero and at most the spec's own cap (-5 looped with no pause)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_SECONDS:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most {MAX_SECONDS}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = common_options(verbose_help="debug log output")
    p = argparse.ArgumentParser(
        prog="imgdist", parents=[common],
        description="Pull approved images as a BitTorrent swarm, verify them, install them read-only into "
                    "the store, seed them, and advertise them to the scheduler.",
        epilog="Each command is also spelled as a flag, as before: --sync, --daemon, --list, --gc, --enable, "
               "--disable, --list_unknown_files, --classad, --slurm-features, --origin DIR "
               "('imgdist --list' is 'imgdist list'). 'imgdist COMMAND --help' explains one command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func, help_text: str, example: str) -> argparse.ArgumentParser:
        alias = next(flag for flag, cmd in FLAG_ALIASES.items() if cmd == name) + (" DIR" if name == "origin" else "")
        c = sub.add_parser(name, parents=[common], help=help_text, epilog=f"example: {example}",
                           description=f"{help_text} (also spelled: imgdist {alias})")
        c.set_defaults(func=func)
        return c

    command("sync", cmd_sync, "one pass: fetch index, verify, pull what is missing, gc",
            "imgdist --spec cluster.yaml sync")
    c = command("daemon", cmd_daemon, "a pass every --interval seconds; seeds in between",
                "imgdist --spec cluster.yaml daemon --interval 60")
    c.add_argument("--interval", type=interval_seconds, default=None, help="seconds between passes (default: imgdist.interval)")
    command("list", cmd_list, "one row per image: state, endorsed, approved, VMs", "imgdist --spec cluster.yaml list")
    c = command("gc", cmd_gc, "remove unwanted images (never one a running VM uses)",
                "imgdist --spec cluster.yaml gc --keep 2")
    c.add_argument("--keep", type=int, default=None,
                   help="versions of each image to keep (0 = all; default: imgdist.keep_versions)")
    command("enable", cmd_enable, "take part in pulling and seeding (persisted)", "imgdist enable")
    command("disable", cmd_disable, "pull and seed nothing (persisted)", "imgdist disable")
    command("unknown-files", cmd_unknown_files, "store files no accepted index explains", "imgdist unknown-files")
    command("classad", cmd_classad, "machine attributes for an HTCondor startd cron", "imgdist classad")
    command("slurm-features", cmd_slurm_features, "the same facts as Slurm node features", "imgdist slurm-features")
    c = command("origin", cmd_origin, "seed the catalogue directory DIR and run the tracker",
                "imgdist --spec origin.yaml origin /srv/catalogue --tracker-port 6969")
    c.add_argument("dir", metavar="DIR", help="a catalogue directory with images/ and torrents/")
    c.add_argument("--tracker-port", type=int, default=6969, help="the tracker's HTTP port")
    return p


def subcommand_argv(argv: list[str]) -> list[str]:
    """The argument list with a flag spelling (`--list`, `--origin DIR`, `--origin=DIR`) turned into
    its subcommand, put first so the options around it (`--spec`, `--keep`, ...) all reach it."""
    found = [i for i, a in enumerate(argv) if a.split("=", 1)[0] in FLAG_ALIASES]
    if len(found) > 1:
        raise ValueError(f"{argv[found[0]]} and {argv[found[1]]} are different commands: give one")
    if not found:
        return argv
    i = found[0]
    flag, eq, value = argv[i].partition("=")
    return [FLAG_ALIASES[flag], *([value] if eq else []), *argv[:i], *argv[i + 1:]]


def _index(spec: ClusterSpec):
    from catalogue.trust import accepted_index

    return accepted_index(spec)


def cmd_list(spec: ClusterSpec, args: argparse.Namespace) -> int:
    from imagedist.listing import render, rows

    print(render(rows(spec, Store.of(spec), _index(spec))), end="")
    return 0


def cmd_sync(spec: ClusterSpec, args: argparse.Namespace) -> int:
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
        print("imgdist is disabled on this host: nothing pulled (imgdist enable)")
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


def cmd_gc(spec: ClusterSpec, args: argparse.Namespace) -> int:
    from imagedist.gc import collect
    from imagedist.store import Busy

    store = Store.of(spec)
    keep = spec.imgdist.keep_versions if args.keep is None else args.keep
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


def cmd_origin(spec: ClusterSpec, args: argparse.Namespace) -> int:
    from imagedist.origin import Origin

    d = Path(args.dir)
    if not (d / "torrents").is_dir() or not (d / "images").is_dir():
        raise SpecError(f"{d}: expected a catalogue directory with images/ and torrents/")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Origin(spec, d, args.tracker_port).run(stop.is_set)
    return 0


def cmd_daemon(spec: ClusterSpec, args: argparse.Namespace) -> int:
    from imagedist.daemon import run_daemon

    return run_daemon(spec, args.interval or float(spec.imgdist.interval))


def switch_host(spec: ClusterSpec, enabled: bool) -> int:
    """`enable` and `disable`: the host's persisted toggle."""
    from imagedist.state import set_enabled

    store = Store.of(spec)
    set_enabled(store, enabled)
    print(f"imgdist {'enabled' if enabled else 'disabled'} on this host ({store.runtime.imgdist_enabled})")
    return 0


def cmd_enable(spec: ClusterSpec, args: argparse.Namespace) -> int:
    return switch_host(spec, True)


def cmd_disable(spec: ClusterSpec, args: argparse.Namespace) -> int:
    return switch_host(spec, False)


def cmd_unknown_files(spec: ClusterSpec, args: argparse.Namespace) -> int:
    from imagedist.gc import unknown_files

    for f in unknown_files(Store.of(spec), _index(spec)):
        print(f)
    return 0


def cmd_classad(spec: ClusterSpec, args: argparse.Namespace) -> int:
    from imagedist.classad import render_classad

    print(render_classad(spec, Store.of(spec), _index(spec)), end="")
    return 0


def cmd_slurm_features(spec: ClusterSpec, args: argparse.Namespace) -> int:
    from imagedist.classad import slurm_features

    print(",".join(slurm_features(spec, Store.of(spec), _index(spec))))
    return 0


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        parser = build_parser()
        try:
            words = subcommand_argv(sys.argv[1:] if argv is None else list(argv))
        except ValueError as e:
            parser.error(str(e))  # a usage error like any other: usage line, exit 2
        args = parse(parser, words)
        setup_logging(args.verbose, quiet_level=logging.INFO)
        return args.func(load_spec(args.spec), args)

    return run_command("imgdist", run)


if __name__ == "__main__":
    sys.exit(main())
