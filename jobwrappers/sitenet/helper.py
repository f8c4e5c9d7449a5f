"""`salvus-nethelper`: the narrow root helper a job's wrapper calls (directly as root, else through
`sudo -n`) for its VM's place on the site network. It reads only the state `network up` wrote for
the namespace it runs in, never the caller's spec.

    reserve ROLE SERVICE_ID OWNER_PID   an address of ROLE's block on this host (JSON on stdout);
                                        held while OWNER_PID (the wrapper) lives
    attach SERVICE_ID QEMU_PID          the anti-spoofing rules for the tap QEMU_PID holds open
                                        (qemu-bridge-helper made it), bound to the leased MAC/IP;
                                        a watcher removes them when that QEMU exits, however it ends
    release SERVICE_ID                  rules and lease gone (a persistent role keeps its address)
    reap                                what belongs to processes that are gone

Leases are files under the host's lease directory, one per address, changed under one lock. A
caller acts only on its own leases and its own QEMU (uid from sudo's SUDO_UID).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from cluster.cliframe import run_command
from cluster.errors import SpecError, TempFailure
from cluster.files import locked, process_start_time, write_atomic_text
from jobwrappers.jobenv import check_service_id
from jobwrappers.sitenet import rules
from jobwrappers.sitenet.host import nft_json, sh
from jobwrappers.sitenet.layout import mac_for
from jobwrappers.sitenet.state import current_host_state, lease_dir

log = logging.getLogger("salvus-nethelper")

TAP_WAIT_S = 10.0  # QEMU opens its tap while it sets up the netdev, well before the guest runs
ROLE_RE = re.compile(r"[a-z][a-z0-9_-]*")


def caller_uid() -> int:
    if os.getuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"])
    return os.getuid()


def proc_uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def alive(pid: int | None, start: int | None) -> bool:
    return bool(pid) and start is not None and process_start_time(pid) == start


class Leases:
    """The host's lease files; use inside `lock()`."""

    def __init__(self, state: dict) -> None:
        self.state = state
        self.dir = lease_dir(state["host"])

    def lock(self):
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return locked(self.dir / "lock")

    def all(self) -> list[dict]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                log.warning("%s: unreadable lease, ignored", p)
        return out

    def save(self, lease: dict) -> None:
        write_atomic_text(self.dir / f"{lease['ip']}.json", json.dumps(lease, sort_keys=True) + "\n", 0o600)

    def drop(self, lease: dict) -> None:
        (self.dir / f"{lease['ip']}.json").unlink(missing_ok=True)

    def live(self, lease: dict) -> bool:
        if lease["state"] == "attached":
            return alive(lease.get("qemu_pid"), lease.get("qemu_start"))
        if lease["state"] == "reserved":
            return alive(lease.get("owner_pid"), lease.get("owner_start"))
        return False

    def end(self, lease: dict) -> None:
        """Rules off; the lease kept as `released` for a persistent role (its address is its own
        until the slots run out), deleted otherwise."""
        if lease["state"] == "attached":
            detach_rules(lease.get("tap", ""), lease["ip"], lease.get("published", []))
        if self.state["roles"].get(lease["role"], {}).get("persistent"):
            self.save({**lease, "state": "released", "since": time.time()})
        else:
            self.drop(lease)

    def reap(self) -> int:
        n = 0
        for lease in self.all():
            if lease["state"] != "released" and not self.live(lease):
                log.info("reaping %s (%s): its process is gone", lease["service_id"], lease["ip"])
                self.end(lease)
                n += 1
        return n


def published_ports() -> dict[int, str]:
    """Port -> VM address of what this host publishes now."""
    out = {}
    for item in nft_json("map", "ip", rules.PUB_TABLE, "published"):
        for key, value in item.get("map", {}).get("elem", []):
            out[int(key)] = value["concat"][0]
    return out


def detach_rules(tap: str, ip: str, published: list[int] = ()) -> None:
    """This VM's chain and map entries. Tap names are reused: an entry under `tap` that points at
    another VM's chain is that VM's, and stays."""
    chain = rules.vm_chain(ip)
    ops = []
    mine = [p for p, addr in published_ports().items() if addr == ip and p in published]
    if mine:
        ops.append(rules.publish_elements("delete", ip, mine).strip())
    targets: dict[str, str] = {}
    for item in nft_json("map", "bridge", rules.TABLE, "vm_ports"):
        for key, verdict in item.get("map", {}).get("elem", []):
            targets[key] = verdict.get("jump", {}).get("target", "")
    ops += [f"delete element bridge {rules.TABLE} vm_ports {{ {rules.q(k)} }}" for k, t in targets.items() if t == chain]
    for item in nft_json("set", "bridge", rules.TABLE, "vm_ifs"):
        if tap and tap in item.get("set", {}).get("elem", []) and targets.get(tap, chain) == chain:
            ops.append(f"delete element bridge {rules.TABLE} vm_ifs {{ {rules.q(tap)} }}")
    if nft_json("chain", "bridge", rules.TABLE, chain):
        ops += [f"flush chain bridge {rules.TABLE} {chain}", f"delete chain bridge {rules.TABLE} {chain}"]
    if ops:
        sh("nft", "-f", "-", stdin="\n".join(ops) + "\n")


def reserve(role: str, service_id: str, owner_pid: int) -> dict:
    state = current_host_state()
    if not ROLE_RE.fullmatch(role) or role not in state["roles"]:
        raise SpecError(f"role {role!r} is not a network: site role of this host's network "
                        f"(network up knows: {', '.join(state['roles']) or 'none'})")
    uid = caller_uid()
    start = process_start_time(owner_pid)
    if start is None or proc_uid(owner_pid) != uid:
        raise SpecError(f"owner pid {owner_pid}: not a process of the caller")
    slots = state["roles"][role]["slots"]
    leases = Leases(state)
    with leases.lock():
        leases.reap()
        current = leases.all()
        mine = [x for x in current if x["service_id"] == service_id]
        if any(x["state"] != "released" for x in mine):
            raise TempFailure(f"{service_id} already has an address on {state['host']} (another job of it runs here)")
        taken = {x["ip"] for x in current}
        ip = next((x["ip"] for x in mine if x["ip"] in slots), None)
        if ip is None:
            ip = next((a for a in slots if a not in taken), None)
        if ip is None:  # only other services' kept addresses left: the longest unused goes
            kept = sorted((x for x in current if x["state"] == "released" and x["ip"] in slots),
                          key=lambda x: x.get("since", 0))
            if not kept:
                raise TempFailure(f"no free address for role {role} on {state['host']} "
                                  f"({len(slots)} in its block {state['roles'][role]['block']} are in use)")
            ip = kept[0]["ip"]
        for x in mine:
            if x["ip"] != ip:
                leases.drop(x)
        lease = {"service_id": service_id, "role": role, "ip": ip, "mac": mac_for(ip), "uid": uid,
                 "state": "reserved", "owner_pid": owner_pid, "owner_start": start, "since": time.time()}
        leases.save(lease)
    return {"host": state["host"], "ip": ip, "mac": lease["mac"], "prefixlen": state["prefixlen"],
            "mtu": state["mtu"], "bridge": state["bridge"], "gateway": state["gateway"]}


def _own_lease(leases: Leases, service_id: str) -> dict:
    uid = caller_uid()
    for lease in leases.all():
        if lease["service_id"] == service_id and lease["state"] != "released" and (uid == 0 or lease["uid"] == uid):
            return lease
    raise SpecError(f"{service_id}: no address reserved by this user on {leases.state['host']}")


def tap_of(pid: int) -> str | None:
    """The tap device QEMU `pid` holds open (the tun descriptor's `iff:` in fdinfo)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/net/tun":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("iff:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    return None


def attach(service_id: str, qemu_pid: int) -> dict:
    state = current_host_state()
    leases = Leases(state)
    start = process_start_time(qemu_pid)
    deadline = time.monotonic() + TAP_WAIT_S
    tap = tap_of(qemu_pid)
    while tap is None and time.monotonic() < deadline and process_start_time(qemu_pid) == start:
        time.sleep(0.1)
        tap = tap_of(qemu_pid)
    if tap is None or start is None:
        raise TempFailure(f"QEMU {qemu_pid} holds no tap (did qemu-bridge-helper attach it to {state['bridge']}?)")
    try:
        master = os.path.basename(os.readlink(f"/sys/class/net/{tap}/master"))
    except OSError:
        master = ""
    if master != state["bridge"]:
        raise TempFailure(f"tap {tap} of QEMU {qemu_pid} is not on {state['bridge']} (on {master or 'no bridge'})")
    with leases.lock():
        leases.reap()  # a dead VM's entries under this tap's name go before this one's go in
        lease = _own_lease(leases, service_id)
        if lease["state"] != "reserved" or proc_uid(qemu_pid) != lease["uid"]:
            raise SpecError(f"QEMU {qemu_pid} is not a process of the user who reserved {service_id}'s address")
        if any(x.get("tap") == tap and x["state"] == "attached" and leases.live(x) for x in leases.all()):
            raise SpecError(f"tap {tap} already belongs to another VM")
        publish = state["roles"][lease["role"]].get("publish", [])
        taken = {p: a for p, a in published_ports().items() if p in publish}
        if taken:
            raise TempFailure(f"{state['host']} already publishes port(s) {', '.join(map(str, taken))} "
                              f"(for {', '.join(sorted(set(taken.values())))}): one VM per published port and host")
        text = rules.attach_rules(tap, lease["ip"], lease["mac"])
        if publish:
            text += rules.publish_elements("add", lease["ip"], publish)
        sh("nft", "-f", "-", stdin=text)
        lease.update(state="attached", tap=tap, qemu_pid=qemu_pid, qemu_start=start, published=publish)
        leases.save(lease)
    # The reaper for this VM: it outlives this call and the wrapper, and ends with the QEMU.
    subprocess.Popen([sys.executable, "-P", "-m", "jobwrappers.sitenet.helper", "watch", service_id, str(qemu_pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    return {"tap": tap, "ip": lease["ip"]}


def release(service_id: str) -> None:
    state = current_host_state()
    leases = Leases(state)
    with leases.lock():
        try:
            lease = _own_lease(leases, service_id)
        except SpecError:
            return  # nothing (left) to release
        leases.end(lease)


def watch(service_id: str, qemu_pid: int) -> None:
    """Waits for QEMU `qemu_pid` to exit (a pidfd: no polling, no pid reuse), then reaps."""
    try:
        fd = os.pidfd_open(qemu_pid)
    except OSError:
        fd = None
    if fd is not None:
        select.select([fd], [], [])
        os.close(fd)
    state = current_host_state()
    leases = Leases(state)
    with leases.lock():
        leases.reap()


def reap() -> int:
    leases = Leases(current_host_state())
    with leases.lock():
        return leases.reap()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="salvus-nethelper", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reserve")
    r.add_argument("role")
    r.add_argument("service_id")
    r.add_argument("owner_pid", type=int)
    a = sub.add_parser("attach")
    a.add_argument("service_id")
    a.add_argument("qemu_pid", type=int)
    sub.add_parser("release").add_argument("service_id")
    w = sub.add_parser("watch")
    w.add_argument("service_id")
    w.add_argument("qemu_pid", type=int)
    sub.add_parser("reap")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="salvus-nethelper: %(message)s")

    def go() -> int:
        if os.geteuid() != 0:
            raise SpecError("salvus-nethelper must run as root (sudo -n salvus-nethelper ...)")
        if getattr(args, "service_id", None) is not None:
            check_service_id(args.service_id)
        if args.cmd == "reserve":
            print(json.dumps(reserve(args.role, args.service_id, args.owner_pid)))
        elif args.cmd == "attach":
            print(json.dumps(attach(args.service_id, args.qemu_pid)))
        elif args.cmd == "release":
            release(args.service_id)
        elif args.cmd == "watch":
            watch(args.service_id, args.qemu_pid)
        else:
            print(reap())
        return 0

    return run_command("salvus-nethelper", go)


if __name__ == "__main__":
    sys.exit(main())
