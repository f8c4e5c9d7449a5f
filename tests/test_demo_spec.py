"""Which spec `salvus_jobs demo` and `image build-demo` use, decided without booting anything."""
from __future__ import annotations

from pathlib import Path

import pytest

import salvus_jobs
from cluster.errors import SpecError
from cluster.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
ONE_ROLE = "store: ./store\nroles: {sage: {image: demo@1, port: 6000}}\n"


@pytest.fixture
def bare_dir(tmp_path, monkeypatch):
    """A working directory with no cluster.yaml and no $SALVUS_SPEC: a fresh checkout's user."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SALVUS_SPEC", raising=False)
    return tmp_path


def test_without_any_spec_the_demo_uses_the_bundled_example(bare_dir):
    assert salvus_jobs.demo_spec_path(None) == REPO / "examples" / "cluster.yaml"
    spec = load_spec(salvus_jobs.demo_spec_path(None))
    assert spec.scheduler.backend == "local"
    assert salvus_jobs.demo_image_dir(spec) == Path.home() / ".local/share/salvus/images/base"


@pytest.mark.parametrize("where", ["flag", "cwd", "env"])
def test_a_spec_the_user_names_wins_over_the_example(bare_dir, monkeypatch, where):
    mine = bare_dir / "cluster.yaml"
    mine.write_text(ONE_ROLE)
    if where == "flag":
        other = bare_dir / "other.yaml"
        other.write_text(ONE_ROLE)
        assert salvus_jobs.demo_spec_path(str(other)) == other
        return
    if where == "env":
        mine = mine.rename(bare_dir / "env.yaml")
        monkeypatch.setenv("SALVUS_SPEC", str(mine))
    assert salvus_jobs.demo_spec_path(None).resolve() == mine


def test_without_the_example_the_usual_no_spec_error(bare_dir, monkeypatch):
    monkeypatch.setattr(salvus_jobs, "EXAMPLE_SPEC", bare_dir / "absent.yaml")
    with pytest.raises(SpecError, match="no spec"):
        salvus_jobs.demo_spec_path(None)


def test_demo_with_a_spec_missing_a_demo_role_is_one_line_78(bare_dir, capsys):
    (bare_dir / "cluster.yaml").write_text(ONE_ROLE)
    assert salvus_jobs.main(["demo"]) == 78
    err = capsys.readouterr().err
    assert err.startswith("salvus_jobs: ") and err.count("\n") == 1 and "hub" in err


def test_status_prints_the_lines_the_demo_prints(bare_dir, capsys):
    from submit.cli import status_lines
    from submit.scale import status_report

    (bare_dir / "cluster.yaml").write_text(ONE_ROLE)
    assert salvus_jobs.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == status_lines(status_report(load_spec(bare_dir / "cluster.yaml")))
    assert out.splitlines()[:3] == ["backend: local", "ROLE  DESIRED  QUEUED  RUNNING  HELD  STOPPING  REGISTERED",
                                    "sage  0        0       0        0     0         0"]
