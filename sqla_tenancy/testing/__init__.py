"""Test support: throwaway PostgreSQL clusters and pytest fixtures (see :mod:`.plugin`)."""

from __future__ import annotations

from .cluster import ClusterError, TemporaryCluster, find_bindir
from .server import TestServer

__all__ = ["ClusterError", "TemporaryCluster", "TestServer", "find_bindir"]
