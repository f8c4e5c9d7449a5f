"""The DRMAA calls, run in their own process: `python -m submit.drmaa_session` reads one JSON
request on stdin and prints one JSON answer.

Why a process: Grid Engine's libdrmaa only loads when libjemalloc is LD_PRELOADed ("cannot allocate
memory in static TLS block" otherwise), and LD_PRELOAD must be set before a process starts; the
CLI (or pytest) was not started that way. It also keeps a DRMAA session — one per process by the
standard — from outliving the call.
"""
from __future__ import annotations

import json
import sys


def handle(request: dict) -> dict:
    import drmaa

    with drmaa.Session() as session:
        op = request["op"]
        if op == "submit":
            ids = []
            for t in request["templates"]:
                jt = session.createJobTemplate()
                try:
                    jt.remoteCommand = t["command"]
                    jt.args = t["args"]
                    jt.jobName = t["name"]
                    jt.nativeSpecification = t["native"]
                    jt.outputPath = ":" + t["stdout"]
                    jt.errorPath = ":" + t["stderr"]
                    jt.jobEnvironment = t["env"]
                    ids.append(session.runJob(jt))
                finally:
                    session.deleteJobTemplate(jt)
            return {"ids": ids}
        if op == "status":
            states = {}
            for job_id in request["ids"]:
                try:
                    states[job_id] = str(session.jobStatus(job_id))
                except drmaa.errors.InvalidJobException:
                    states[job_id] = "gone"
            return {"states": states}
        if op == "terminate":
            for job_id in request["ids"]:
                try:
                    session.control(job_id, drmaa.JobControlAction.TERMINATE)
                except drmaa.errors.InvalidJobException:
                    pass
            return {}
        raise ValueError(f"unknown op {op!r}")


def main() -> int:
    try:
        request = json.load(sys.stdin)
    except ValueError as e:
        print(json.dumps({"error": f"bad request: {e}", "kind": "usage"}))
        return 2
    try:
        answer = handle(request)
    except Exception as e:  # every DRMAA error becomes one line for the caller to classify
        kind = "unavailable" if type(e).__name__ in ("DrmCommunicationException", "DrmsInitException",
                                                     "NoActiveSessionException") else "error"
        print(json.dumps({"error": f"{type(e).__name__}: {e}".strip(), "kind": kind}))
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
