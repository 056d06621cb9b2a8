"""The example API with Flask. ``python -m examples.flask_app`` runs it on a private PostgreSQL."""

from __future__ import annotations

from .app import create_app, dispose_app

__all__ = ["create_app", "dispose_app"]
