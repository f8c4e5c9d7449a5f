"""The controller's status over HTTP (`controller.listen`, loopback by default):

    /status   JSON: per role desired/queued/running/held/healthy/unhealthy/draining, every job with
              its state, endpoint, health, age and time left, and the last events
    /metrics  the same figures in Prometheus' text format (prometheus_client), with the
              boot-to-registered and queue-wait histograms, probe failures and replacements
    /         a small HTML page with the same tables that reloads itself every interval

Served by the project's bounded threading server (`cluster.httpserver`); read-only, no scripts:
every value on the page (service ids, hold reasons: anyone's text) is HTML-escaped.
"""
from __future__ import annotations

import html
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cluster.errors import TempFailure
from cluster.httpserver import ServerLimits, SiteHTTPServer

if TYPE_CHECKING:
    from submit.controller import Controller

log = logging.getLogger(__name__)

ROLE_FIGURES = ("desired", "queued", "running", "held", "stopping", "registered", "healthy", "unhealthy", "retiring",
                "draining")
# Boots of the demo guest take seconds, a Debian guest under TCG minutes, a queue hours.
BOOT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


class Metrics:
    """The controller's figures in a registry of its own (no process-wide state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = Gauge("salvus_role_jobs", "Jobs of a role by figure (desired, running, healthy, ...)",
                          ["role", "figure"], registry=r)
        self.leader = Gauge("salvus_controller_leader", "1 while this controller holds the lease", registry=r)
        self.events = Counter("salvus_controller_events", "Decisions by kind", ["kind"], registry=r)
        self.probe_failures = Counter("salvus_probe_failures", "Failed health probes", ["role"], registry=r)
        self.replacements = Counter("salvus_replacements", "Unhealthy services replaced", ["role"], registry=r)
        self.submissions = Counter("salvus_submissions", "Jobs submitted by the controller", ["role"], registry=r)
        self.cycle_failures = Counter("salvus_controller_cycle_failures", "Cycles that failed", registry=r)
        self.boot_to_registered = Histogram("salvus_boot_to_registered_seconds",
                                            "From submission to the service registered", buckets=BOOT_BUCKETS, registry=r)
        self.successions = Counter("salvus_successions", "Jobs retired for their walltime or an upgrade",
                                   ["role", "reason"], registry=r)
        self.handover_gap = Gauge("salvus_handover_gap_seconds",
                                  "A persistent role's last hand-over: deregistered to serving again", ["role"],
                                  registry=r)
        self.queue_wait = Histogram("salvus_queue_wait_seconds", "From submission to the job running",
                                    buckets=WAIT_BUCKETS, registry=r)

    def update(self, roles: dict[str, dict]) -> None:
        for role, figures in roles.items():
            for f in ROLE_FIGURES:
                self.role.labels(role, f).set(figures.get(f, 0))

    def text(self) -> bytes:
        return generate_latest(self.registry)


def page(status: dict) -> str:
    """The HTML page: the roles table, the jobs table, the last events."""
    e = html.escape
    refresh = max(1, int(status.get("interval") or 5))
    head = ["ROLE", *(f.upper() for f in ROLE_FIGURES)]
    role_rows = "".join(
        f'<tr class="role" data-role="{e(role)}"><td>{e(role)}</td>'
        + "".join(f"<td>{int(c.get(f, 0))}</td>" for f in ROLE_FIGURES) + "</tr>"
        for role, c in status.get("roles", {}).items())
    job_rows = "".join(
        f"<tr><td>{e(str(j['job_id']))}</td><td>{e(j['role'])}</td><td>{e(j['state'])}</td>"
        f"<td>{e(str(j['service_id']))}</td><td>{e(j['endpoint'] or '-')}</td><td>{e(j['health'])}</td>"
        f"<td>{j['age']:.0f}s</td><td>{e(str(j['hold_reason'] or ''))}</td></tr>"
        for j in status.get("jobs", []))
    events = "".join(f"<li>{e(time.strftime('%H:%M:%S', time.localtime(ev['time'])))} {e(ev['kind'])}: "
                     f"{e(ev['text'])}</li>" for ev in reversed(status.get("events", [])[-20:]))
    who = f"{status.get('role', '?')} ({status.get('holder', '')})"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh}">
<title>salvus-jobs controller</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #999;padding:2px 6px}}</style>
</head><body>
<h1>salvus-jobs controller</h1>
<p id="who">{e(who)}, leader {e(str(status.get('leader', '')))}</p>
<table id="roles"><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{role_rows}</table>
<h2>Jobs</h2>
<table id="jobs"><tr><th>JOB</th><th>ROLE</th><th>STATE</th><th>SERVICE</th><th>ENDPOINT</th><th>HEALTH</th>
<th>AGE</th><th>NOTE</th></tr>{job_rows}</table>
<h2>Events</h2><ul id="events">{events}</ul>
</body></html>
"""


def make_handler(controller: "Controller") -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "salvus-controller"

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("%s: " + fmt, self.client_address[0], *args)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/status":
                self._send(200, "application/json", json.dumps(controller.status).encode())
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, controller.metrics.text())
            elif path == "/":
                self._send(200, "text/html; charset=utf-8", page(controller.status).encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def serve(controller: "Controller") -> SiteHTTPServer | None:
    """Starts the status server in a daemon thread; None when `listen` has port 0."""
    host, port = split_listen(controller.cfg.listen)
    if port == 0:
        return None
    try:
        server = SiteHTTPServer((host, port), make_handler(controller),
                                ServerLimits(header_timeout=10, request_timeout=10, max_connections=64, max_per_client=16))
    except OSError as e:  # in use (another controller here, or the last one not gone yet): worth retrying
        raise TempFailure(f"controller.listen {controller.cfg.listen}: cannot listen: {e.strerror or e}") from None
    threading.Thread(target=server.serve_forever, name="status-http", daemon=True).start()
    log.info("status on http://%s:%d/ (/status, /metrics)", host, port)
    return server


def fetch_status(listen: str, timeout: float = 3.0) -> dict | None:
    """The running controller's /status at `listen` (a wildcard address is asked on loopback);
    None when none answers there."""
    host, port = split_listen(listen)
    if port == 0:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = json.loads(r.read(8 << 20))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def controller_report(spec) -> dict | None:
    """`status` from the controller holding the lease, when one does and answers at
    `controller.listen`; None otherwise (then `status` asks the scheduler itself)."""
    from cluster.errors import RegistryUnavailable
    from cluster.registry import open_registry
    from cluster.registry.lease import CONTROLLER_LEASE, holder_kind

    try:
        with open_registry(spec) as registry:
            info = registry.lease(CONTROLLER_LEASE)
    except RegistryUnavailable:
        return None
    if info is None or holder_kind(info.holder) != "controller":
        return None
    status = fetch_status(spec.controller.listen)
    if not status or status.get("role") != "leader" or status.get("holder") != info.holder:
        return None  # another machine's controller, or not one cycle done yet
    return status
