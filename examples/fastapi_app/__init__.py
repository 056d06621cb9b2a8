"""The example API with FastAPI. ``python -m examples.fastapi_app`` runs it on a private PostgreSQL."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
