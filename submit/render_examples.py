"""The shipped job files, `submit/examples/ROLE_vm.{sub,sbatch,pbs}`, as fresh renders of the
templates: `python -m submit.render_examples` (scripts/render-examples) writes them, and the test
suite compares them with `render_examples()`, so they never drift from what `render` prints.

They are rendered from `submit/examples/cluster.yaml` read as if installed at INSTALLED_SPEC, so
the files name the paths a site has rather than this checkout's.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cluster.files import write_atomic
from cluster.spec import parse_spec
from submit import open_backend

EXAMPLES = Path(__file__).resolve().parent / "examples"
EXAMPLE_SPEC = EXAMPLES / "cluster.yaml"
INSTALLED_SPEC = Path("/etc/salvus/cluster.yaml")
SUFFIXES = {"condor": "sub", "slurm": "sbatch", "pbs": "pbs"}


def render_examples() -> dict[Path, str]:
    """Every example file's path and the text a fresh render gives it."""
    spec = parse_spec(EXAMPLE_SPEC.read_bytes(), INSTALLED_SPEC)
    out = {}
    for backend_name, suffix in SUFFIXES.items():
        backend = open_backend(spec, backend_name)
        for role in spec.roles:
            out[EXAMPLES / f"{role}_vm.{suffix}"] = backend.render(role)
    return out


def main() -> int:
    for path, text in render_examples().items():
        if not path.exists() or path.read_text() != text:
            write_atomic(path, text.encode())
            print(f"wrote {path.relative_to(EXAMPLES.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
