"""HTCondor: submit descriptions; submit, query and remove through the `htcondor2` bindings.

Jobs carry `SalvusSite`, `SalvusRole` and `SalvusServiceId` attributes, so one constraint query
finds a site's jobs by role. Removal sends `kill_sig` (SIGTERM) and SIGKILL after
`job_max_vacate_time`, which the description sets from the wrapper's grace.
"""
from __future__ import annotations

import re

from cluster.errors import SchedulerError, SchedulerUnavailable, SpecError
from cluster.yamlmodel import split_image_ref
from submit.base import Backend, Job, checked_service_id
from submit.condor_check import command_key, submit_keys, validate_submit

# JobStatus codes (HTCondor manual, "Job ClassAd Attributes") -> ours.
JOB_STATUS = {1: "queued", 2: "running", 3: "stopping", 4: "done", 5: "held", 6: "running", 7: "held"}
PROJECTION = ["ClusterId", "ProcId", "JobStatus", "SalvusRole", "SalvusServiceId", "QDate", "HoldReason"]


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
        if value != value.strip() or any(c in value for c in "$'\"\\"):
            raise SpecError(f"{self.spec.source}: {what} {value!r} cannot go into an HTCondor submit "
                            "description: no $, quotes, backslashes or surrounding spaces")
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

