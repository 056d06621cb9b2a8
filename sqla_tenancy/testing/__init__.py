"""Test support: throwaway PostgreSQL clusters and pytest fixtures (see :mod:`.plugin`)."""

from __future__ import annotations

from .cluster import ClusterError, TemporaryCluster, find_bindir
from .server import ServerURLError, TestServer

__all__ = ["ClusterError", "ServerURLError", "TemporaryCluster", "TestServer", "find_bindir"]
