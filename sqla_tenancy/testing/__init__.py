"""Test support: throwaway PostgreSQL clusters, the pytest plugin (see :mod:`.plugin`), the
isolation checker (:mod:`.isolation`) and factory-boy factories (:mod:`.factories`, needs the
``testing`` extra)."""

from __future__ import annotations

from .cluster import ClusterError, TemporaryCluster, find_bindir
from .isolation import (
    Finding,
    IsolationError,
    IsolationReport,
    IsolationSetupError,
    assert_tenant_isolation,
    check_tenant_isolation,
)
from .server import ServerURLError, TestServer

__all__ = [
    "ClusterError",
    "Finding",
    "IsolationError",
    "IsolationReport",
    "IsolationSetupError",
    "ServerURLError",
    "TemporaryCluster",
    "TestServer",
    "assert_tenant_isolation",
    "check_tenant_isolation",
    "find_bindir",
]
