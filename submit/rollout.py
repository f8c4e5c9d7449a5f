"""Rolling upgrades: which image a role's new jobs boot, and the state of a role's rollout.

One registry row per role (state kind `rollout`) says what the role is moving to: `target` (the
NAME@VERSION new jobs boot), `previous` (what it replaces; new jobs boot it again once the rollout
halted), the failures counted against `target`, whether it `halted` and why, and `spec_image` (the
spec's `image:` the row was made from: a later edit of the spec starts a new rollout). A role
without a row boots the spec's image. `salvus_jobs upgrade` writes the row; the controller
replaces the VMs (submit/controller.py) and counts failures here. Rows are anyone's writing: one
that does not parse, or names an image that is not NAME@VERSION, is ignored with a warning.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

from cluster.errors import SpecError
from cluster.registry import Registry
from cluster.spec import ClusterSpec
from cluster.yamlmodel import split_image_ref

log = logging.getLogger(__name__)

ROLLOUT = "rollout"  # the registry's state kind: role -> Rollout as JSON


@dataclass
class Rollout:
    target: str
    previous: str
    spec_image: str
    failures: int = 0
    halted: bool = False
    reason: str = ""
    started: float = 0.0

    @property
    def image(self) -> str:
        """What a new job of the role boots now."""
        return self.previous if self.halted else self.target

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Rollout":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError("not an object")
        r = cls(target=d["target"], previous=d["previous"], spec_image=d["spec_image"],
                failures=d.get("failures", 0), halted=d.get("halted", False), reason=d.get("reason", ""),
                started=d.get("started", 0.0))
        for ref in (r.target, r.previous, r.spec_image):
            split_image_ref(ref)  # full match NAME@VERSION (raises ValueError)
        if type(r.failures) is not int or r.failures < 0 or type(r.halted) is not bool \
                or not isinstance(r.reason, str) or not isinstance(r.started, (int, float)):
            raise TypeError("bad field types")
        return r


def read_rollouts(spec: ClusterSpec, registry: Registry) -> dict[str, Rollout]:
    """The rollout rows of this spec's roles that parse."""
    out = {}
    for role, text in registry.read_state(ROLLOUT).items():
        if role not in spec.roles:
            continue
        try:
            out[role] = Rollout.from_json(text)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("ignoring unreadable rollout row for %s: %s", role, e)
    return out


def write_rollout(registry: Registry, role: str, rollout: Rollout | None) -> None:
    registry.write_state(ROLLOUT, role, rollout.to_json() if rollout else None)


def current(spec: ClusterSpec, role: str, rollouts: dict[str, Rollout]) -> Rollout:
    """The role's rollout, following an edit of the spec's `image:` (a new rollout from what the
    role booted to the spec's new image); a role never upgraded rolls out nothing."""
    image = spec.role(role).image
    r = rollouts.get(role)
    if r is None:
        return Rollout(target=image, previous=image, spec_image=image)
    if r.spec_image != image:
        return Rollout(target=image, previous=r.image, spec_image=image, started=time.time())
    return r


def start_upgrade(spec: ClusterSpec, registry: Registry, role: str, image: str) -> Rollout:
    """`salvus_jobs upgrade ROLE --image NAME@VERSION`: the role's VMs move to `image`."""
    try:
        split_image_ref(image)
    except ValueError as e:
        raise SpecError(f"upgrade --image: {e}") from None
    if spec.role(role).image_path:
        raise SpecError(f"{spec.source}: roles.{role}: boots its own image_path file; an upgrade names a "
                        "catalogue image: remove image_path, or edit image_path and restart its jobs")
    now = current(spec, role, read_rollouts(spec, registry))
    r = Rollout(target=image, previous=now.image, spec_image=now.spec_image, started=time.time())
    write_rollout(registry, role, r)
    return r


def rollback(spec: ClusterSpec, registry: Registry, role: str) -> Rollout:
    """`salvus_jobs upgrade ROLE --rollback`: back to what the last rollout replaced."""
    now = current(spec, role, read_rollouts(spec, registry))
    if now.previous == now.target:
        raise SpecError(f"upgrade --rollback: {role} has no rollout to return from (it boots {now.image})")
    r = Rollout(target=now.previous, previous=now.target, spec_image=now.spec_image, started=time.time())
    write_rollout(registry, role, r)
    return r
