"""The service registry: where hubs find compute servers. Liveness is a TTL refreshed by heartbeats.

`open_registry(spec)` picks the backend named by the spec's `registry` section.
"""
from __future__ import annotations

from cluster.registry.base import Registry, Service
from cluster.spec import ClusterSpec


def open_registry(spec: ClusterSpec) -> Registry:
    if spec.registry.backend == "cassandra":
        from cluster.extras import require

        require("cassandra.cluster", "cassandra", "registry.cassandra")
        from cluster.registry.cassandra import CassandraRegistry  # imported lazily: heavy driver

        return CassandraRegistry(spec.registry.cassandra, ttl=spec.registry.ttl)
    from cluster.registry.sqlite import SqliteRegistry

    return SqliteRegistry(spec.sqlite_path, ttl=spec.registry.ttl)


__all__ = ["Registry", "Service", "open_registry"]
