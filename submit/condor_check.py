"""Offline validation of HTCondor submit descriptions.

`htcondor2.Submit` parses a description without a schedd but accepts any command name (a typo such
as `request_cpu` silently becomes a macro nobody reads) and drops everything after the first
`queue`. So on top of it we check: every command name against the set documented in the
condor_submit manual, custom attributes (`+Name`/`MY.Name`) and policy expressions with `classad2`,
exactly one `queue` statement, last, every other line a comment or one `command = value`, and no
command set twice (the last one wins silently: a second `executable` would replace ours).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

# condor_submit(1), "Submit Description File Commands" (basic, matchmaking, file transfer, policy,
# universe-specific and advanced commands), lower-cased.
DOCUMENTED_COMMANDS = frozenset("""
arguments environment error executable getenv input log log_xml notification notify_user output
priority queue universe description batch_name
rank request_cpus request_disk request_memory request_gpus require_gpus gpus_minimum_capability
gpus_maximum_capability gpus_minimum_memory gpus_minimum_runtime cuda_version requirements
dont_encrypt_input_files dont_encrypt_output_files encrypt_execute_directory encrypt_input_files
encrypt_output_files max_transfer_input_mb max_transfer_output_mb output_destination
should_transfer_files skip_filechecks stream_error stream_input stream_output transfer_executable
transfer_input_files transfer_output_files transfer_output_remaps when_to_transfer_output
transfer_plugins transfer_checkpoint_files checkpoint_destination preserve_relative_paths
erase_output_and_error_on_restart manifest manifest_dir want_io_proxy
max_retries retry_until success_exit_code hold keep_claim_idle leave_in_queue next_job_start_delay
on_exit_hold on_exit_hold_reason on_exit_hold_subcode on_exit_remove periodic_hold
periodic_hold_reason periodic_hold_subcode periodic_release periodic_remove periodic_vacate
allowed_execute_duration allowed_job_duration max_idle max_materialize
accounting_group accounting_group_user concurrency_limits concurrency_limits_expr copy_to_spool
coresize cron_day_of_month cron_day_of_week cron_hour cron_minute cron_month cron_prep_time
cron_window dagman_log deferral_prep_time deferral_time deferral_window email_attributes
image_size initialdir job_ad_information_attrs job_lease_duration job_machine_attrs
job_machine_attrs_history_length job_max_vacate_time kill_sig kill_sig_timeout hold_kill_sig
remove_kill_sig load_profile match_list_length max_job_retirement_time nice_user noop_job
noop_job_exit_code noop_job_exit_signal remote_initialdir rendezvousdir run_as_owner stack_size
submit_event_notes ulog_execute_attrs use_x509userproxy x509userproxy want_graceful_removal
docker_image docker_network_type container_image container_service_names container_target_dir
transfer_container want_remote_io starter_debug use_oauth_services
vm_type vm_memory vm_networking vm_disk vm_checkpoint vm_no_output_vm vm_networking_type
vm_macaddr xen_initrd xen_kernel xen_kernel_params xen_root
""".split())
# Commands whose value is a ClassAd expression (checked with classad2).
EXPRESSION_COMMANDS = frozenset("""requirements rank on_exit_hold on_exit_remove on_exit_hold_reason
on_exit_hold_subcode periodic_hold periodic_remove periodic_release periodic_vacate retry_until
periodic_hold_reason periodic_hold_subcode""".split())
_ATTR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # use with fullmatch
_MACRO_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.]*)\)")
_QUEUE_RE = re.compile(r"^\s*queue\b", re.I)
_COMMAND_RE = re.compile(r"\s*(\+?[A-Za-z_][A-Za-z0-9_.]*)\s*=.*")  # use with fullmatch
# The one conditional our files use: a default a command-line assignment (`condor_submit X=...`,
# read before the file) is not overwritten by.
_IF_UNDEFINED_RE = re.compile(r"\s*if\s+!\s*defined\s+[A-Za-z_][A-Za-z0-9_]*\s*")
_ENDIF_RE = re.compile(r"\s*endif\s*")


def command_key(line: str) -> str | None:
    """The command a `key = value` line sets, as HTCondor compares them (case-insensitive, `+X`
    is `MY.X`); None for any other line."""
    m = _COMMAND_RE.fullmatch(line)
    if not m:
        return None
    key = m.group(1).lower()
    return "my." + key[1:] if key.startswith("+") else key


def submit_keys(text: str) -> dict[str, int]:
    """Each command the description sets and the line (from 1) that first sets it."""
    keys: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        key = command_key(line)
        if key is not None:
            keys.setdefault(key, n)
    return keys


def _line_problems(lines: list[str], source: str) -> list[str]:
    """Lines that are neither a comment, a `command = value`, an `if ! defined NAME` default block
    nor the queue statement, and commands set twice."""
    problems: list[str] = []
    first: dict[str, int] = {}
    opened = 0  # the line of an `if ! defined` not closed yet
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#") or _QUEUE_RE.match(line):
            continue
        if _IF_UNDEFINED_RE.fullmatch(line) or _ENDIF_RE.fullmatch(line):
            if bool(opened) == bool(_IF_UNDEFINED_RE.fullmatch(line)):
                problems.append(f"{source}: line {n}: {'nested if' if opened else 'endif without if'}")
            opened = 0 if opened else n
            continue
        key = command_key(line)
        if key is None:
            problems.append(f"{source}: line {n}: expected 'command = value', got {line.strip()[:60]!r}")
        elif key in first:
            problems.append(f"{source}: line {n}: {key} is set again (first on line {first[key]}); "
                            "HTCondor would keep the last one")
        else:
            first[key] = n
    if opened:
        problems.append(f"{source}: line {opened}: 'if' without 'endif'")
    return problems


def _without_macros(value: str) -> str:
    """Macros are expanded per job; a number stands in for them so the expression still parses."""
    return _MACRO_RE.sub("0", value)


def validate_submit(text: str, source: str = "<submit>") -> list[str]:
    """Problems found in a submit description, each one line naming the file and command."""
    from cluster.extras import require

    htcondor2 = require("htcondor2", "condor", "checking an HTCondor submit description")
    import classad2

    problems: list[str] = []
    lines = text.splitlines()
    queue_lines = [i for i, ln in enumerate(lines, 1) if _QUEUE_RE.match(ln)]
    if len(queue_lines) != 1:
        problems.append(f"{source}: expected exactly one 'queue' statement, found {len(queue_lines)}")
    elif any(ln.strip() and not ln.lstrip().startswith("#") for ln in lines[queue_lines[0]:]):
        problems.append(f"{source}: line {queue_lines[0]}: commands after 'queue' are ignored by HTCondor")
    problems += _line_problems(lines, source)
    try:
        sub = htcondor2.Submit(text)
    except Exception as e:  # the bindings raise their own exception types for syntax errors
        return problems + [f"{source}: htcondor2 cannot parse it: {e}"]
    keys = list(sub.keys())
    used_macros = {m.lower() for m in _MACRO_RE.findall(text)}
    if "executable" not in {k.lower() for k in keys}:
        problems.append(f"{source}: executable: required command is missing")
    for key in keys:
        low = key.lower()
        value = sub[key]
        if low.startswith("my.") or key.startswith("+"):
            name = key.split(".", 1)[1] if low.startswith("my.") else key[1:]
            if not _ATTR_RE.fullmatch(name):
                problems.append(f"{source}: {key}: not a valid ClassAd attribute name")
            problems += _check_expr(classad2, source, key, value)
        elif low in DOCUMENTED_COMMANDS:
            if low in EXPRESSION_COMMANDS:
                problems += _check_expr(classad2, source, key, value)
        elif low not in used_macros:
            close = difflib.get_close_matches(low, DOCUMENTED_COMMANDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{source}: {key}: not a documented submit command and not used as a "
                            f"$({key}) macro{hint}")
    return problems


def _check_expr(classad2, source: str, key: str, value: str) -> list[str]:
    try:
        classad2.ExprTree(_without_macros(value))
    except Exception:  # classad2 raises ClassAdException (not exported under a stable name)
        return [f"{source}: {key}: not a valid ClassAd expression: {value!r}"]
    return []


def validate_submit_file(path: Path) -> list[str]:
    return validate_submit(path.read_text(), str(path))
