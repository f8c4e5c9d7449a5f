"""HTCondor: submit descriptions; submit, query and remove through the `htcondor2` bindings.

Jobs carry `SalvusSite`, `SalvusRole` and `SalvusServiceId` attributes, so one constraint query
finds a site's jobs by role. Removal sends `kill_sig` (SIGTERM) and SIGKILL after
`job_max_vacate_time`, which the description sets from the wrapper's grace.
"""
from __future__ import annotations

from cluster.errors import SchedulerError, SchedulerUnavailable
from submit.base import Backend, Job
from submit.condor_check import validate_submit

# JobStatus codes (HTCondor manual, "Job ClassAd Attributes") -> ours.
JOB_STATUS = {1: "queued", 2: "running", 3: "stopping", 4: "done", 5: "held", 6: "running", 7: "held"}
PROJECTION = ["ClusterId", "ProcId", "JobStatus", "SalvusRole", "SalvusServiceId", "QDate", "HoldReason"]


def classad_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class CondorBackend(Backend):
    """Talks to the schedd through the bindings, not client commands: nothing goes through the
    runner (a remote schedd is reached by `scheduler.schedd`/`collector` instead)."""

    name = "condor"
    template = "condor.sub.tmpl"

    def requirements(self, role: str, service_id: str | None) -> str:
        r = self.role(role)
        parts = [f"stringListMember({classad_string(f'{r.image_name}-{r.image_version}')}, TARGET.SalvusImages)"]
        host = self.host_for(role, service_id)
        if host:
            parts.append(f"TARGET.Machine == {classad_string(host)}")  # where the persistent disk lives
        if self.spec.scheduler.requirements:
            parts.append(f"({self.spec.scheduler.requirements})")
        return " && ".join(parts)

    def render(self, role: str, service_id: str | None = None) -> str:
        default = service_id or (f"{role}-0" if self.role(role).persistent else f"{role}-$(ClusterId).$(ProcId)")
        extra = "".join(f"{d}\n" for d in self.spec.scheduler.extra_directives)
        if self.spec.scheduler.queue:
            extra += f"+SalvusQueue = {classad_string(self.spec.scheduler.queue)}\n"
        if self.spec.scheduler.account:
            extra += f"accounting_group = {self.spec.scheduler.account}\n"
        walltime_s = self.resources(role).walltime_s
        if walltime_s:
            extra += f"allowed_job_duration = {walltime_s}\n"
        return self.render_template(self.template, role, service_id=default,
                                    requirements=self.requirements(role, service_id), extra=extra)

    # --- the schedd ------------------------------------------------------------------------------
    def schedd(self):
        import htcondor2

        try:
            if self.spec.scheduler.schedd:
                collector = htcondor2.Collector(self.spec.scheduler.collector) if self.spec.scheduler.collector \
                    else htcondor2.Collector()
                ad = collector.locate(htcondor2.DaemonType.Schedd, self.spec.scheduler.schedd)
                return htcondor2.Schedd(ad)
            return htcondor2.Schedd()
        except htcondor2.HTCondorException as e:
            where = self.spec.scheduler.schedd or "the local schedd"
            raise SchedulerUnavailable(f"condor: cannot reach {where}: {e}") from None

    def prepare_submit(self, role: str) -> None:
        super().prepare_submit(role)
        self._submit_schedd = self.schedd()  # located once per submission, not once per job

    def submit_one(self, role: str, service_id: str | None) -> str:
        import htcondor2

        text = self.render(role, service_id)
        problems = validate_submit(text, f"{self.job_name(role)}.sub")
        if problems:
            raise SchedulerError(problems[0])
        body = text[:text.rindex("queue")]  # the count is schedd.submit's, not the text's
        try:
            result = self._submit_schedd.submit(htcondor2.Submit(body), count=1)
        except htcondor2.HTCondorException as e:
            raise SchedulerError(f"condor: submit refused: {e}") from None
        return f"{result.cluster()}.0"

    def list(self, role: str | None = None) -> list[Job]:
        import htcondor2

        constraint = f"SalvusSite == {classad_string(self.spec.site)}"
        if role:
            constraint += f" && SalvusRole == {classad_string(role)}"
        try:
            ads = self.schedd().query(constraint=constraint, projection=PROJECTION)
        except htcondor2.HTCondorException as e:
            raise SchedulerUnavailable(f"condor: query failed: {e}") from None
        return [job_from_ad(ad, self.name) for ad in ads if ad.get("SalvusRole") in self.spec.roles]

    def cancel(self, job: Job) -> None:
        import htcondor2

        try:
            self.schedd().act(htcondor2.JobAction.Remove, [job.job_id])
        except htcondor2.HTCondorException as e:
            raise SchedulerUnavailable(f"condor: remove {job.job_id} failed: {e}") from None


def job_from_ad(ad, backend_name: str) -> Job:
    job_id = f"{ad['ClusterId']}.{ad['ProcId']}"
    state = JOB_STATUS.get(int(ad.get("JobStatus", 0)), "unknown")
    return Job(job_id, ad["SalvusRole"], state, ad.get("SalvusServiceId"), float(ad.get("QDate", 0)),
               str(ad.get("HoldReason", "")) if state == "held" else "", backend_name)

