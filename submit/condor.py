"""HTCondor: submit descriptions; submit, query, edit and remove through the `htcondor2` bindings.

Jobs carry `SalvusSite`, `SalvusRole`, `SalvusServiceId`, `SalvusImage` and (from `scale`) the
submission's `SalvusToken`, so one constraint query finds a site's jobs by role; "ours" is also
`Owner == scheduler.submit_user`, so another account's look-alike jobs never count. Removal sends
`kill_sig` (SIGTERM) and SIGKILL after `job_max_vacate_time`, which the description sets from the
wrapper's grace. `allowed_job_duration` (the walltime) puts a job on hold (HoldReasonCode 46) after
sending it the same signals: such a job is listed `failed`, `ended_by=walltime`, and `cancel`
removes it. Jobs that have left the queue are read from the schedd's history.
"""
from __future__ import annotations

import re

from cluster.errors import SchedulerError, SchedulerUnavailable, SpecError
from cluster.yamlmodel import is_image_ref, is_service_id, split_image_ref
from submit.base import Backend, Job, checked_service_id
from submit.condor_check import command_key, submit_keys, validate_submit

# JobStatus codes (HTCondor manual, "Job ClassAd Attributes") -> ours.
JOB_STATUS = {1: "queued", 2: "running", 3: "stopping", 4: "done", 5: "held", 6: "running", 7: "held"}
PROJECTION = ["ClusterId", "ProcId", "JobStatus", "Owner", "SalvusSite", "SalvusRole", "SalvusServiceId",
              "SalvusImage", "SalvusToken", "QDate", "HoldReason", "HoldReasonCode", "JobCurrentStartDate",
              "AllowedJobDuration", "ExitCode", "NumJobStarts", "RemoteHost", "LastRemoteHost",
              "LastHoldReasonCode", "SalvusAfter"]
# HoldReasonCode of a job `allowed_job_duration` stopped and of one submitted on hold (HTCondor
# manual, "Job ClassAd Attributes").
HOLD_JOB_DURATION = 46
HOLD_SUBMITTED_ON_HOLD = 15
# The hold reason a successor waiting for its predecessor is listed with (state "queued").
WAITING = "waiting for its predecessor to leave the queue"


def bindings():
    """The `htcondor2` module (the `condor` group: an operator's machine has it, execute nodes need not)."""
    from cluster.extras import require

    return require("htcondor2", "condor", "scheduler.backend: condor")


def classad_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def condor_arguments(args: list[str]) -> str:
    """`arguments` in HTCondor's new syntax: the whole in double quotes; an argument with anything
    but plain characters, or a macro (its value is known only at submit time), in single quotes
    with a quote of either kind doubled, so spaces never split an argument."""
    def one(a: str) -> str:
        if re.fullmatch(r"[A-Za-z0-9_.,@+=:/-]+", a):
            return a
        return "'" + a.replace("'", "''").replace('"', '""') + "'"
    return '"' + " ".join(one(a) for a in args) + '"'


class CondorBackend(Backend):
    """Talks to the schedd through the bindings, not client commands: nothing goes through the
    runner (a remote schedd is reached by `scheduler.schedd`/`collector` instead)."""

    name = "condor"
    template = "condor.sub.tmpl"
    tokens = True
    # A successor is submitted held (`hold = true`, +SalvusAfter) and released by the controller
    # (start_successors) once its predecessor has left the queue: HTCondor has no dependency of
    # its own outside DAGMan, and an idle successor pinned to the host would start beside its
    # predecessor in the partitionable slot's free share, before the disk is free.
    dependencies = True

    def requirements(self, role: str, service_id: str | None) -> str:
        parts = []
        if self.image_feature(role):  # the same rule as Slurm's --constraint; HTCondor has its own attribute
            name, version = split_image_ref(self.job_image(role))
            parts.append(f"stringListMember({classad_string(f'{name}-{version}')}, TARGET.SalvusImages)")
        host = self.host_for(role, service_id)
        if host:
            parts.append(f"TARGET.Machine == {classad_string(host)}")  # where the persistent disk lives
        parts += [f"TARGET.Machine != {classad_string(h)}" for h in self.excluded_hosts(role, service_id)]
        if self.spec.scheduler.requirements:
            parts.append(f"({self.spec.scheduler.requirements})")
        return " && ".join(parts) or "true"

    def render(self, role: str, service_id: str | None = None) -> str:
        checked_service_id(service_id)
        default = service_id or (f"{role}-0" if self.role(role).persistent else f"{role}-$(ClusterId).$(ProcId)")
        s = self.spec.scheduler
        # Fixed keys with values this code writes: strings as ClassAd string literals, paths as
        # macro values refused when they hold anything the submit language would interpret.
        extra = ""
        if s.queue:
            extra += f"+SalvusQueue = {classad_string(s.queue)}\n"
        if s.account:
            extra += f"accounting_group = {s.account}\n"  # a SchedulerWord: no spaces, no quotes
        walltime_s = self.resources(role).walltime_s
        if walltime_s:
            extra += f"allowed_job_duration = {walltime_s}\n"
        raw = self.template_values(role)
        values = {**raw, "wrapper": self.macro_value("scheduler.wrapper", raw["wrapper"]),
                  "spec": self.macro_value("the spec's path", raw["spec"]),
                  "log_dir": self.macro_value("scheduler.log_dir", raw["log_dir"]),
                  "site_ad": classad_string(raw["site"]), "role_ad": classad_string(role),
                  "service_id_ad": classad_string(default), "image_ad": classad_string(raw["image"]),
                  "arguments": condor_arguments(["--spec", "$(SALVUS_SPEC)", "--role", role, "--image", raw["image"],
                                                "--service-id", default]),
                  "requirements": self.requirements(role, service_id)}
        # The site's lines are checked against the keys the description sets without them.
        site_lines = self.extra_directive_lines(self.render_template(self.template, {**values, "extra": extra}))
        return self.render_template(self.template, {**values, "extra": extra + site_lines})

    def macro_value(self, what: str, value: str) -> str:
        if value != value.strip() or any(c in value for c in "$'\"\\#\n"):
            raise SpecError(f"{self.spec.source}: {what} {value!r} cannot go into an HTCondor submit "
                            "description: no $, #, quotes, backslashes or surrounding spaces")
        return value

    def extra_directive_lines(self, text: str) -> str:
        """The site's `scheduler.extra_directives`, each one `key = value` command that sets a key
        the description does not already set (a second `executable` would replace ours)."""
        fixed = submit_keys(text)
        out = ""
        for i, d in enumerate(self.spec.scheduler.extra_directives):
            key = command_key(d)
            if key is None or key == "queue":
                raise SpecError(f"{self.spec.source}: scheduler.extra_directives[{i}]: expected one "
                                f"'command = value' line, got {d[:60]!r}")
            if key in fixed:
                raise SpecError(f"{self.spec.source}: scheduler.extra_directives[{i}]: {key} is set by "
                                f"salvus (line {fixed[key]} of the description); it cannot be redefined")
            fixed[key] = -1
            out += d + "\n"
        return out

    # --- the schedd ------------------------------------------------------------------------------
    def schedd(self):
        """The schedd named by `scheduler.schedd` (found through the collector), else this
        machine's own, else the pool's only one (an operator's machine that runs no schedd)."""
        htcondor2 = bindings()

        s = self.spec.scheduler
        try:
            collector = htcondor2.Collector(s.collector) if s.collector else htcondor2.Collector()
            if s.schedd:
                return htcondor2.Schedd(collector.locate(htcondor2.DaemonType.Schedd, s.schedd))
            try:
                return htcondor2.Schedd()
            except htcondor2.HTCondorException as local:
                ads = collector.query(htcondor2.AdType.Schedd, projection=["Name", "MyAddress", "CondorVersion"])
                if len(ads) != 1:
                    raise htcondor2.HTCondorException(
                        f"{local} (and the pool has {len(ads)} schedds: set scheduler.schedd)") from None
                return htcondor2.Schedd(ads[0])
        except htcondor2.HTCondorException as e:
            where = s.schedd or "the local schedd"
            raise SchedulerUnavailable(f"condor: cannot reach {where}: {e}") from None

    def prepare_submit(self, role: str) -> None:
        super().prepare_submit(role)
        self._submit_schedd = self.schedd()  # located once per submission, not once per job

    def submit_one(self, role: str, service_id: str | None, token: str = "", after: str = "") -> str:
        htcondor2 = bindings()

        text = self.render(role, service_id)
        problems = validate_submit(text, f"{self.job_name(role)}.sub")
        if problems:
            raise SchedulerError(problems[0])
        if after and not re.fullmatch(r"\d+\.\d+", after):
            raise SchedulerError(f"condor: a successor waits for a ClusterId.ProcId, got {after[:40]!r}")
        body = text[:text.rindex("queue")]  # the count is schedd.submit's, not the text's
        sub = htcondor2.Submit(body)
        if after:
            # On the predecessor's machine: its disk is there (a role without `hosts` is pinned too).
            host = self.machine_of(after)
            if host:
                sub["requirements"] = f"({sub['requirements']}) && TARGET.Machine == {classad_string(host)}"
        if token:
            sub["+SalvusToken"] = classad_string(token)
        if after:
            sub["hold"] = "true"
            sub["+SalvusAfter"] = classad_string(after)
        try:
            result = self._submit_schedd.submit(sub, count=1)
            self.check_owner(result.cluster())
        except htcondor2.HTCondorException as e:
            raise SchedulerError(f"condor: submit refused: {e}") from None
        return f"{result.cluster()}.0"

    def check_submitter(self) -> None:
        """HTCondor's Owner is the identity the schedd authenticated (a token's subject, say), not
        this process's user: it is checked on the first job instead (check_owner)."""

    def check_owner(self, cluster: int) -> None:
        """Removes a job the schedd took under another Owner than `submit_user` and refuses: it
        would never be listed as ours, and every `scale` would submit another."""
        htcondor2 = bindings()

        ads = self._submit_schedd.query(constraint=f"ClusterId == {int(cluster)}", projection=["Owner"])
        owner = str(ads[0].get("Owner", "")) if ads else self.submit_user
        if owner != self.submit_user:
            self._submit_schedd.act(htcondor2.JobAction.Remove, f"ClusterId == {int(cluster)}")
            raise SpecError(f"{self.spec.source}: scheduler.submit_user is {self.submit_user!r} but the schedd "
                            f"owns our jobs as {owner!r} (the identity it authenticated): removed job {cluster}.0; "
                            "set scheduler.submit_user, or submit with that user's credentials")

    def ours(self, role: str | None = None) -> str:
        """The constraint of this site's jobs (of `role`) submitted by the site's account."""
        constraint = (f"Owner == {classad_string(self.submit_user)} && "
                      f"SalvusSite == {classad_string(self.spec.site)}")
        if role:
            constraint += f" && SalvusRole == {classad_string(role)}"
        return constraint

    def list(self, role: str | None = None) -> list[Job]:
        htcondor2 = bindings()

        try:
            ads = self.schedd().query(constraint=self.ours(role), projection=PROJECTION)
        except htcondor2.HTCondorException as e:
            raise SchedulerUnavailable(f"condor: query failed: {e}") from None
        return [job_from_ad(ad, self.name) for ad in ads if self.is_ours(ad)]

    def is_ours(self, ad) -> bool:
        # The constraint already said so; the ad is checked again in case a schedd ignored it.
        return (ad.get("Owner") == self.submit_user and ad.get("SalvusSite") == self.spec.site
                and ad.get("SalvusRole") in self.spec.roles)

    def machine_of(self, job_id: str) -> str | None:
        """The Machine a running job of ours runs on (from its RemoteHost, `slot1_1@node-a`)."""
        cluster, _, proc = job_id.partition(".")
        ads = self._submit_schedd.query(constraint=f"({self.ours()}) && ClusterId == {int(cluster)} && "
                                                   f"ProcId == {int(proc)}", projection=["RemoteHost"])
        host = str(ads[0].get("RemoteHost", "")).rpartition("@")[2] if ads else ""
        return host if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", host) else None

    def start_successors(self, listed: list[Job]) -> list[str]:
        """Releases each successor whose predecessor is no longer in the queue (its wrapper has
        exited: the disk is free). The release is one schedd command; the job then matches at the
        next negotiation, pinned to the predecessor's host."""
        htcondor2 = bindings()

        present = {j.job_id for j in listed if j.state not in ("done", "failed")}
        ready = [j for j in listed if j.after and j.state == "queued" and j.hold_reason == WAITING
                 and j.after not in present]
        if not ready:
            return []
        try:
            self.schedd().act(htcondor2.JobAction.Release, [j.job_id for j in ready])
        except htcondor2.HTCondorException as e:
            raise SchedulerUnavailable(f"condor: release of {', '.join(j.job_id for j in ready)} failed: {e}") from None
        for j in ready:
            j.hold_reason = ""
        return [f"{j.role} job {j.job_id} ({j.service_id}) released: job {j.after} has left the queue" for j in ready]

    def known_but_not_listed(self, role: str | None, listed: list[Job]) -> list[Job]:
        """Jobs we submitted that left the queue, as the schedd's history tells how they ended
        (`unknown` when the history no longer has them)."""
        htcondor2 = bindings()

        gone = super().known_but_not_listed(role, listed)
        if not gone:
            return gone
        ids = " || ".join(f"(ClusterId == {int(j.job_id.split('.')[0])} && ProcId == {int(j.job_id.split('.')[1])})"
                          for j in gone if re.fullmatch(r"\d+\.\d+", j.job_id))
        try:
            ads = list(self.schedd().history(constraint=f"({self.ours(role)}) && ({ids or 'false'})",
                                              projection=PROJECTION, match=len(gone)))
        except htcondor2.HTCondorException as e:
            raise SchedulerUnavailable(f"condor: history query failed: {e}") from None
        ended = {f"{a['ClusterId']}.{a['ProcId']}": job_from_ad(a, self.name, history=True)
                 for a in ads if self.is_ours(a)}
        return [ended.get(j.job_id, j) for j in gone]

    def cancel(self, job: Job) -> None:
        htcondor2 = bindings()

        try:
            self.schedd().act(htcondor2.JobAction.Remove, [job.job_id])
        except htcondor2.HTCondorException as e:
            raise SchedulerUnavailable(f"condor: remove {job.job_id} failed: {e}") from None

    def forget(self, job: Job) -> None:
        """A job `allowed_job_duration` put on hold stays in the queue, held, until removed: it is
        removed here, when scale or the controller let go of it."""
        if job.state == "failed" and job.ended_by == "walltime":
            self.cancel(job)
        super().forget(job)

    def exclude_hosts(self, jobs: list[Job], hosts: list[str]) -> bool:
        """condor_qedit of each idle job's Requirements: the expression a new job gets, avoiding
        exactly `hosts` (not the one a persistent job is pinned to: its disk is there); the
        schedd refuses edits of running jobs, which are past placement."""
        htcondor2 = bindings()

        saved, self.unfit_hosts = self.unfit_hosts, []
        try:
            schedd = self.schedd()
            for job in jobs:
                pinned = self.host_for(job.role, job.service_id)
                avoid = [f"TARGET.Machine != {classad_string(h)}" for h in hosts if h != pinned]
                schedd.edit([job.job_id], "Requirements", " && ".join([f"({self.requirements(job.role, job.service_id)})",
                                                                      *avoid]))
        except htcondor2.HTCondorException as e:
            raise SchedulerUnavailable(f"condor: edit of Requirements failed: {e}") from None
        finally:
            self.unfit_hosts = saved
        return True

    def signal_lead_s(self, role: str) -> float:
        # allowed_job_duration signals at the limit itself; the guest's stop and cleanup come out of
        # the job's last grace seconds, so the controller counts from limit - grace.
        res = self.resources(role)
        return float(res.grace_s) if res.walltime_s else 0.0


def _str(ad, key: str, check) -> str:
    """A job ad's string attribute, "" unless it is well-formed (ads are the submitter's writing)."""
    value = ad.get(key)
    return value if isinstance(value, str) and check(value) else ""


def _number(ad, key: str) -> float | None:
    value = ad.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def job_from_ad(ad, backend_name: str, history: bool = False) -> Job:
    """A queue or history ad as a Job: the walltime clock (JobCurrentStartDate, AllowedJobDuration),
    the image, and for a job that ended how it ended."""
    job_id = f"{ad['ClusterId']}.{ad['ProcId']}"
    status = int(ad.get("JobStatus", 0))
    state = JOB_STATUS.get(status, "unknown")
    hold_reason = str(ad.get("HoldReason", "")) if state == "held" else ""
    by_duration = HOLD_JOB_DURATION in (ad.get("HoldReasonCode"), ad.get("LastHoldReasonCode"))
    after = _str(ad, "SalvusAfter", lambda v: re.fullmatch(r"\d+\.\d+", v) is not None)
    ended_by = ""
    if state == "held" and after and ad.get("HoldReasonCode") == HOLD_SUBMITTED_ON_HOLD:
        state, hold_reason = "queued", WAITING  # a successor: capacity to come, not a fault
    elif state == "held" and by_duration:
        state, ended_by = "failed", "walltime"  # stopped by its limit: no capacity, removed by cancel
    elif history and status in (3, 4):  # removed (in the queue: still stopping) or completed
        state = "done"
        ended_by = "walltime" if by_duration else "cancel" if status == 3 else "exit"
    elif status == 4:
        ended_by = "exit"
    sid = _str(ad, "SalvusServiceId", is_service_id)
    started = _number(ad, "JobCurrentStartDate") if state in ("running", "stopping") else None
    return Job(job_id, ad["SalvusRole"], state, sid or f"{ad['SalvusRole']}-{job_id}", float(ad.get("QDate", 0)),
               hold_reason, backend_name, token=_str(ad, "SalvusToken", str.isalnum), started=started,
               walltime_s=_number(ad, "AllowedJobDuration"), image=_str(ad, "SalvusImage", is_image_ref),
               ended_by=ended_by, after=after)

