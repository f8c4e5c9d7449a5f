"""Machine attributes for an HTCondor startd cron (and the same facts as Slurm node features).

Only images that are installed AND endorsed by an accepted index that has not expired AND approved
are advertised: those are the ones the wrapper will agree to boot.

Slurm node features name the image and its version (`slurm_feature`), so that the job a backend
renders for `sage@2` (`--constraint`, submit.base.Backend.image_feature) never lands on a host
holding only `sage@1`.
"""
from __future__ import annotations

import re

from cluster.spec import ClusterSpec
from imagedist.state import is_enabled
from cluster.store import Store


def bootable_images(spec: ClusterSpec, store: Store, index) -> list:
    from catalogue.approvals import load, refusal

    if index is None or index.expired():
        return []  # the wrapper refuses an expired index (65): a host must not be matched by it
    approvals = load(spec)
    return [e for e in index.entries
            if not e.expired() and (store.base / e.file_name).is_file() and refusal(spec, e, approvals) is None]


def attr_suffix(name: str) -> str:
    """ClassAd attribute names are [A-Za-z_][A-Za-z0-9_]*; image names may hold '.', '+', '-'."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def render_classad(spec: ClusterSpec, store: Store, index) -> str:
    entries = bootable_images(spec, store, index)
    images = ",".join(f"{e.name}-{e.version}" for e in entries)
    lines = [f'SalvusImages = "{images}"']
    for name in sorted({e.name for e in entries}):
        lines.append(f"HasSalvusImage_{attr_suffix(name)} = true")
    lines.append(f'SalvusImgdist = "{"enabled" if is_enabled(store) else "disabled"}"')
    return "\n".join(lines) + "\n"


# Image names and versions hold letters, digits, '.', '_', '+', '-'. Features keep letters, digits
# and '-' and spell the rest with '_' and a letter, '_v' between name and version: `sage@1.0` is
# `salvus_img_sage_v1_d0`. Slurm 22.05 takes '.', '+' and '@' in a feature as they are, but a PBS
# resource list splits `nodes=` at '+' and tools that check constraints (ReFrame) refuse '.';
# every '_' of a feature starts one of these pairs, so two images never share a feature.
FEATURE_PREFIX = "salvus_img_"
FEATURE_ESCAPES = {"_": "_u", ".": "_d", "+": "_p"}
FEATURE_SEPARATOR = "_v"


def _feature_part(text: str) -> str:
    return "".join(FEATURE_ESCAPES.get(c, c) for c in text)


def slurm_feature(name: str, version: str) -> str:
    """The node feature of image NAME@VERSION (`salvus_img_sage_v1_d0` for sage@1.0)."""
    return f"{FEATURE_PREFIX}{_feature_part(name)}{FEATURE_SEPARATOR}{_feature_part(version)}"


def image_of_feature(feature: str) -> tuple[str, str] | None:
    """(name, version) back from a feature `slurm_feature` made; None for any other string."""
    part = "(?:[A-Za-z0-9-]|_[" + "".join(v[1] for v in FEATURE_ESCAPES.values()) + "])+"
    m = re.fullmatch(f"{FEATURE_PREFIX}({part}){FEATURE_SEPARATOR}({part})", feature)
    if m is None:
        return None
    unescape = {v: k for k, v in FEATURE_ESCAPES.items()}
    name, version = (re.sub("_.", lambda c: unescape[c[0]], g) for g in m.groups())
    return name, version


def slurm_features(spec: ClusterSpec, store: Store, index) -> list[str]:
    """Node feature names for the same facts (one per bootable NAME@VERSION), for `scontrol update`."""
    return sorted({slurm_feature(e.name, e.version) for e in bootable_images(spec, store, index)})
