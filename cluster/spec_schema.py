"""The spec's JSON Schema, from the same pydantic models the loader validates with, so an editor
(YAML language servers take a `# yaml-language-server: $schema=...` line) can check and complete
`cluster.yaml`. Every section is closed (`additionalProperties: false`, the models' `extra='forbid'`):
a key the loader refuses fails the schema too. What only the loader can check (files that exist,
cross-field rules such as heartbeat_interval < ttl) stays the loader's."""
from __future__ import annotations

from pydantic import TypeAdapter

from cluster.spec import ClusterSpec

DIALECT = "https://json-schema.org/draft/2020-12/schema"
INTERNAL = ("source",)  # set from the file's name; the loader refuses it in a file


def spec_json_schema() -> dict:
    schema = TypeAdapter(ClusterSpec).json_schema(mode="validation")
    for key in INTERNAL:
        schema["properties"].pop(key, None)
        if key in schema.get("required", []):
            schema["required"].remove(key)
    return {"$schema": DIALECT, **schema, "title": "salvus-jobs cluster spec (cluster.yaml)"}
