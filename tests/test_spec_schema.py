"""`salvus_jobs spec schema`: the spec's JSON Schema is as strict as the loader for what a schema
can say (closed sections, types, patterns): the shipped examples pass it, and a misspelt key that
the loader refuses fails it too."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.errors import SpecError
from cluster.spec import parse_spec

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = [REPO / "examples" / "cluster.yaml", REPO / "submit" / "examples" / "cluster.yaml"]


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    from tests.conftest import run_cli

    r = run_cli("spec", "schema")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def test_every_section_is_closed(schema):
    assert schema["additionalProperties"] is False and "source" not in schema["properties"]
    opened = [name for name, d in schema["$defs"].items()
              if d.get("type") == "object" and "properties" in d and d.get("additionalProperties") is not False]
    assert opened == [], opened


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_shipped_examples_pass(schema, path):
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("section, typo", [(None, "sheduler"), ("scheduler", "walltme"), ("hypervisor", "stop_timout")])
def test_a_misspelt_key_fails_the_schema_as_it_fails_the_loader(schema, tmp_path, section, typo):
    data = yaml.safe_load(EXAMPLES[1].read_text())
    (data.setdefault(section, {}) if section else data)[typo] = 1
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    assert any(typo in e.message and "Additional properties" in e.message for e in errors), [e.message for e in errors]
    with pytest.raises(SpecError, match=typo):
        parse_spec(yaml.safe_dump(data), tmp_path / "cluster.yaml")
