"""Machine attributes for an HTCondor startd cron (and the same facts as Slurm node features).

Only images that are installed AND endorsed by the accepted index AND approved are advertised:
those are the ones the wrapper will agree to boot.
"""
from __future__ import annotations

import re

from cluster.spec import ClusterSpec
from imagedist.state import is_enabled
from cluster.store import Store


def bootable_images(spec: ClusterSpec, store: Store, index) -> list:
    from catalogue.approvals import load, refusal

    if index is None:
        return []
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


def slurm_features(spec: ClusterSpec, store: Store, index) -> list[str]:
    """Node feature names for the same facts (`salvus_img_sage`), for `scontrol update`."""
    return [f"salvus_img_{attr_suffix(n)}" for n in sorted({e.name for e in bootable_images(spec, store, index)})]
