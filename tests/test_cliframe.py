"""The frame the three commands share: one line and the exit code for a SalvusError, 130 for Ctrl-C,
one table format; imgdist's subcommands and the flag spellings that still mean them."""
from __future__ import annotations

import pytest

import salvus_jobs
from cluster import cliframe
from cluster.errors import DataError
from imagedist import cli as imgdist_cli
from jobwrappers import vmjob

IMGDIST_COMMANDS = [["sync"], ["daemon"], ["list"], ["gc"], ["enable"], ["disable"], ["unknown-files"],
                    ["classad"], ["slurm-features"], ["origin", "catdir"]]
SALVUS_JOBS_COMMANDS = [["services"], ["scale", "sage=1"], ["status"], ["stop", "--all"], ["render", "sage"], ["controller"],
                        ["image", "build-demo"], ["demo"], ["catalogue", "approve", "demo@1"],
                        ["catalogue", "accept"]]


def one_line(err: str, prog: str) -> str:
    assert err.startswith(f"{prog}: ") and err.count("\n") == 1, err
    return err


def test_run_command_turns_errors_into_one_line_and_the_code(capsys):
    def bad() -> int:
        raise DataError("sage@1: sha256 mismatch")

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert cliframe.run_command("prog", bad) == 65
    assert capsys.readouterr().err == "prog: sage@1: sha256 mismatch\n"
    assert cliframe.run_command("prog", interrupted) == 130
    assert cliframe.run_command("prog", lambda: None) == 0


def test_format_table_pads_columns_and_strips_trailing_blanks():
    assert cliframe.format_table(["A", "BB", "C"], [["xyz", "1", ""], ["", "22", "q"]]).splitlines() == [
        "A    BB  C", "xyz  1", "     22  q"]
    assert cliframe.format_table(["ONLY"], []) == "ONLY"


@pytest.mark.parametrize("argv, expected", [
    (["--spec", "s.yaml", "--list"], ["list", "--spec", "s.yaml"]),
    (["--gc", "--keep", "2", "--spec", "s.yaml"], ["gc", "--keep", "2", "--spec", "s.yaml"]),
    (["--keep", "2", "--gc"], ["gc", "--keep", "2"]),
    (["--origin", "/srv/cat", "--tracker-port", "7000"], ["origin", "/srv/cat", "--tracker-port", "7000"]),
    (["--origin=/srv/cat"], ["origin", "/srv/cat"]),
    (["--list_unknown_files"], ["unknown-files"]),
    (["-v", "--daemon", "--interval", "60"], ["daemon", "-v", "--interval", "60"]),
    (["list", "--spec", "s.yaml"], ["list", "--spec", "s.yaml"]),
])
def test_imgdist_flag_spellings_become_subcommands(argv, expected):
    assert imgdist_cli.subcommand_argv(argv) == expected
    imgdist_cli.build_parser().parse_args(expected)  # and the subcommand accepts what came with it


def test_imgdist_two_flag_commands_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        imgdist_cli.main(["--list", "--sync"])
    assert e.value.code == 2 and "different commands" in capsys.readouterr().err


@pytest.fixture
def no_spec(tmp_path, monkeypatch):
    """A directory without cluster.yaml and no $SALVUS_SPEC; the spec every command is given is absent."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SALVUS_SPEC", raising=False)
    return str(tmp_path / "absent.yaml")


@pytest.mark.parametrize("argv", IMGDIST_COMMANDS + [["--list"], ["--origin", "catdir"]], ids=" ".join)
def test_every_imgdist_command_reports_a_spec_error_as_one_line_78(no_spec, capsys, argv):
    assert imgdist_cli.main([*argv, "--spec", no_spec]) == 78
    assert "absent.yaml: cannot read spec" in one_line(capsys.readouterr().err, "imgdist")


@pytest.mark.parametrize("argv", SALVUS_JOBS_COMMANDS, ids=" ".join)
def test_every_salvus_jobs_command_reports_a_spec_error_as_one_line_78(no_spec, capsys, argv):
    assert salvus_jobs.main([*argv, "--spec", no_spec]) == 78
    assert "absent.yaml: cannot read spec" in one_line(capsys.readouterr().err, "salvus_jobs")


def test_vmjob_reports_a_spec_error_as_one_line_78(no_spec, capsys, monkeypatch):
    monkeypatch.setattr(vmjob.signal, "signal", lambda *_a: None)  # keep pytest's own SIGINT/SIGTERM handlers
    assert vmjob.main(["--spec", no_spec, "--role", "sage"]) == 78
    assert "absent.yaml: cannot read spec" in one_line(capsys.readouterr().err, "salvus-vmjob")


def test_ctrl_c_in_a_command_exits_130(no_spec, monkeypatch, capsys):
    def interrupted(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(imgdist_cli, "load_spec", interrupted)
    assert imgdist_cli.main(["list"]) == 130
    monkeypatch.setattr("cluster.cli.load_spec", interrupted)
    assert salvus_jobs.main(["services"]) == 130
    assert capsys.readouterr().err == ""


def test_imgdist_list_and_its_flag_spelling_print_the_same(imgdist_lab):
    imgdist_lab.add_image("sage", "1.0", 8, roles=("sage",))
    imgdist_lab.add_image("hub", "1.0", 8, roles=("hub",))
    imgdist_lab.sign()
    h = imgdist_lab.host("h0", approve=("sage@1.0",), tracker=False)
    assert imgdist_lab.run(h, "sync").returncode == 0
    by_flag, by_command = imgdist_lab.run(h, "--list"), imgdist_lab.run(h, "list")
    assert by_flag.returncode == by_command.returncode == 0, by_flag.stderr + by_command.stderr
    assert by_flag.stdout == by_command.stdout
    lines = by_command.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "SIZE", "VIRTUAL", "STATE", "ENDORSED", "APPROVED", "VMS"]
    assert {line.split()[0] for line in lines[1:]} == {"sage", "hub"}


def test_format_table_escapes_control_characters_from_registry_rows():
    out = cliframe.format_table(["HOST"], [["\x1b]0;owned\x07"], ["a\nb\x9b"]])
    assert out.splitlines() == ["HOST", "\\x1b]0;owned\\x07", "a\\x0ab\\x9b"]
    assert not any(c in out for c in "\x1b\x07\x9b")
