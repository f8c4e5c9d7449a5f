"""The controller's status page in a real headless browser (Debian's chromium), and its JSON and
metrics, from a real controller process (no VMs: every role's count is 0)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_controller import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def controller(tmp_path):
    port = free_port()
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"site: page\nstore: {tmp_path}/store\n"
                    f"controller: {{interval: 1, lease: 3, listen: '127.0.0.1:{port}'}}\n"
                    "roles:\n  sage: {image: demo@1, port: 6000, count: 0}\n  hub: {image: demo@1, port: 8080}\n")
    log = open(tmp_path / "controller.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "salvus_jobs"), "--spec", str(spec), "controller"],
                            stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(base + "/status", timeout=2) as r:
                if json.loads(r.read()).get("cycles"):
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "controller.log").read_text()
        time.sleep(0.2)
    yield base, spec
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    log.close()
    assert "lease: released" in (tmp_path / "controller.log").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup chromium)")
def test_the_status_page_renders_the_roles_rows_in_chromium(controller, tmp_path):
    base, _ = controller
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={profile}", "--dump-dom", base + "/"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # The browser built the table: one row per role, with the desired count in its cell.
    assert '<tr class="role" data-role="sage"><td>sage</td><td>0</td>' in html, html[:3000]
    assert 'data-role="hub"' in html and "<title>salvus-jobs controller</title>" in html
    assert 'http-equiv="refresh"' in html and "leader" in html


def test_status_json_metrics_and_the_status_command_read_the_controller(controller, cli):
    base, spec = controller
    with urllib.request.urlopen(base + "/status", timeout=5) as r:
        st = json.loads(r.read())
    assert st["role"] == "leader" and set(st["roles"]) == {"sage", "hub"}
    assert st["roles"]["sage"]["desired"] == 0 and st["jobs"] == []
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    assert families["salvus_controller_leader"].samples[0].value == 1
    assert {s.labels["role"] for s in families["salvus_role_jobs"].samples} == {"sage", "hub"}
    r = cli("--spec", str(spec), "status")
    assert r.returncode == 0 and "controller: controller " in r.stdout and "HEALTHY" in r.stdout, r.stdout + r.stderr
    # scale with a controller running records the counts for it and says so.
    r = cli("--spec", str(spec), "scale", "sage=0", "hub=0")
    assert r.returncode == 0 and "holds the lease and acts on them" in r.stdout, r.stdout + r.stderr
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/nosuch", timeout=5)
    assert e.value.code == 404
