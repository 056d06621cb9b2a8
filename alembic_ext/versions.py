"""The two migration streams and their version tables: defined in the core
(:mod:`sqla_tenancy.versions`, which provisioning needs too), re-exported here for the extension."""

from __future__ import annotations

from sqla_tenancy.versions import (
    INFRASTRUCTURE,
    STREAMS,
    TENANT,
    VERSION_TABLES,
    config_stream_heads,
    format_revision,
    has_stream,
    load_config,
    stream_heads,
    version_table_script,
)

__all__ = [
    "INFRASTRUCTURE",
    "STREAMS",
    "TENANT",
    "VERSION_TABLES",
    "config_stream_heads",
    "format_revision",
    "has_stream",
    "load_config",
    "stream_heads",
    "version_table_script",
]
