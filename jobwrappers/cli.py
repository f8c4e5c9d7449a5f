"""Subcommands of salvus_jobs contributed by the jobwrappers package: `image build-demo`, `demo`."""
from __future__ import annotations

import argparse
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cluster.errors import SpecError, TempFailure
from cluster.registry import Service, open_registry
from cluster.spec import ClusterSpec, load_spec, resolve_spec_path
from jobwrappers.demo_image import DEMO_NAME, DEMO_VERSION, build_demo_image, demo_image_paths

EXAMPLE_SPEC = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"
DEMO_COUNTS = {"sage": 2, "hub": 1, "cassandra": 1}
DEMO_EXPRESSION = "12345*6789+(2**20)"


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    image = sub.add_parser("image", parents=[common], help="build images for this machine")
    isub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    p = isub.add_parser("build-demo", parents=[common],
                        help="build the tiny demo guest image (kernel, initramfs, qcow2 root)",
                        description="Builds demo-1.qcow2, demo-1.vmlinux and demo-1.initrd from this "
                                    "machine's Debian kernel and busybox in a few seconds, without root "
                                    "mounts. Default --out: STORE/images/base of the spec.",
                        epilog="example: salvus_jobs --spec examples/cluster.yaml image build-demo")
    p.add_argument("--out", type=Path, help="directory for the image files")
    p.set_defaults(func=cmd_build_demo)

    p = sub.add_parser("demo", parents=[common],
                       help="the whole system on this machine: sage=2 hub=1 cassandra=1, one computation",
                       description="Builds the demo image if missing, scales sage=2 hub=1 cassandra=1 on the "
                                   "spec's scheduler (the local executor by default), waits until all are "
                                   "registered, sends one computation through the hub to a sage VM, prints "
                                   "the answer and the status, then stops everything (unless --keep).",
                       epilog="example: salvus_jobs --spec examples/cluster.yaml demo")
    p.add_argument("--keep", action="store_true", help="leave the VMs running")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for all VMs to be healthy (default: 2 x hypervisor.boot_timeout)")
    p.set_defaults(func=cmd_demo)


def demo_spec(arg: str | None) -> ClusterSpec:
    """--spec, ./cluster.yaml or $SALVUS_SPEC as usual; on a fresh checkout, examples/cluster.yaml."""
    try:
        resolve_spec_path(arg)
    except SpecError:
        if EXAMPLE_SPEC.is_file():
            return load_spec(EXAMPLE_SPEC)
        raise
    return load_spec(arg)


def demo_image_dir(spec: ClusterSpec) -> Path:
    """Where the spec expects the demo image: beside a role's image_path, else the store's base dir."""
    for role in spec.roles.values():
        if role.image_path and Path(role.image_path).name == f"{DEMO_NAME}-{DEMO_VERSION}.qcow2":
            return Path(role.image_path).parent
    return spec.store_path / "images" / "base"


def cmd_build_demo(args: argparse.Namespace) -> int:
    out = args.out or demo_image_dir(demo_spec(args.spec))
    image = build_demo_image(out)
    for p in image.paths():
        print(p)
    return 0


def http_get(host: str, port: int, path: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_healthy(spec: ClusterSpec, counts: dict[str, int], timeout: float) -> dict[str, list[Service]]:
    deadline = time.monotonic() + timeout
    last = ""
    with open_registry(spec) as reg:
        while True:
            live = {role: reg.lookup(role) for role in counts}
            line = " ".join(f"{r}={len(live[r])}/{n}" for r, n in counts.items())
            if line != last:
                print(f"registered: {line}", flush=True)
                last = line
            if all(len(live[r]) >= n for r, n in counts.items()):
                return live
            if time.monotonic() > deadline:
                raise TempFailure(f"demo: not all VMs registered within {timeout:.0f} s ({line}); "
                                  "see `salvus_jobs status` and the job logs in STORE/logs/")
            time.sleep(1)


def compute_through_hub(hub: Service, n_sages: int, timeout: float) -> str:
    """Waits until the hub knows its sages, then forwards one computation through it."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_get(hub.host, hub.port, "/")
        if status == 200 and len(json.loads(body).get("sages", [])) >= n_sages:
            break
        if time.monotonic() > deadline:
            raise TempFailure(f"demo: hub {hub.service_id} did not learn its sages within {timeout:.0f} s")
        time.sleep(0.5)
    status, body = http_get(hub.host, hub.port, "/compute?expr=" + urllib.parse.quote(DEMO_EXPRESSION))
    if status != 200:
        raise TempFailure(f"demo: hub {hub.service_id} answered {status}: {body.strip()}")
    return body.strip()


def cassandra_report(svc: Service) -> str:
    with socket.create_connection((svc.host, svc.port), timeout=10) as s:
        s.shutdown(socket.SHUT_WR)
        return s.makefile().readline().strip()


def cmd_demo(args: argparse.Namespace) -> int:
    from submit.cli import cmd_status
    from submit.scale import scale, stop_roles

    spec = demo_spec(args.spec)
    for role in DEMO_COUNTS:
        spec.role(role)
    image = demo_image_paths(demo_image_dir(spec))
    if not image.exists():
        print(f"building the demo image in {image.disk.parent}", flush=True)
        build_demo_image(image.disk.parent)
    timeout = args.timeout or 2 * float(spec.hypervisor.boot_timeout)
    t0 = time.monotonic()
    plan, submitted = scale(spec, dict(DEMO_COUNTS))
    for line in plan.describe():
        print(line)
    try:
        live = wait_healthy(spec, DEMO_COUNTS, timeout)
        print(f"all {sum(DEMO_COUNTS.values())} VMs registered in {time.monotonic() - t0:.1f} s")
        hub = live["hub"][0]
        answer = compute_through_hub(hub, DEMO_COUNTS["sage"], timeout=60)
        print(f"hub {hub.service_id} ({hub.endpoint}) forwarded {DEMO_EXPRESSION} to a sage VM: {answer}")
        print(f"cassandra {live['cassandra'][0].service_id}: {cassandra_report(live['cassandra'][0])}")
        print()
        cmd_status(argparse.Namespace(spec=spec.source, json=False))
    finally:
        if not args.keep:
            print("stopping the demo VMs", flush=True)
            stopped = stop_roles(spec, list(DEMO_COUNTS), wait=True)
            print(f"stopped {len(stopped)} job(s)")
    return 0
