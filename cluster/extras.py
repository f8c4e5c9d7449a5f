"""The optional dependency groups of pyproject.toml (cassandra, libvirt, condor, drmaa): an execute
node installs none of them unless its site uses them, so a missing one is a one-line configuration
error naming the group to install, never an ImportError traceback."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from cluster.errors import SpecError


def require(module: str, group: str, what: str) -> ModuleType:
    """`module`, imported; SpecError (78) naming `what` needs it and the group that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing(module, group, what, e.msg) from None


def require_installed(module: str, group: str, what: str) -> None:
    """Like `require`, for a module only a helper process imports (DRMAA loads its C library at
    import): found, not imported."""
    if importlib.util.find_spec(module) is None:
        raise missing(module, group, what, f"No module named {module!r}")


def missing(module: str, group: str, what: str, detail: str) -> SpecError:
    return SpecError(f"{what} needs the Python module {module!r}, which is not installed here "
                     f"({detail}): install salvus-jobs with its '{group}' group "
                     f"(pip install 'salvus-jobs[{group}]', or scripts/install-execute-node --extras {group})")
