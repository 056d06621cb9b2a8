"""The passwords of the login roles sqla-tenancy creates: derived from the secret key, stored
nowhere, and handed to PostgreSQL as SCRAM verifiers computed here (so that the iteration count is
the configured one on every PostgreSQL version, and the password never crosses the wire)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["derive_password", "scram_verifier"]


def derive_password(secret: bytes, role: str) -> str:
    """The password of a per-tenant role: HMAC-SHA256 of the role name under the secret key."""
    digest = hmac.new(secret, f"sqla-tenancy:{role}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The ``SCRAM-SHA-256$...`` verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    Derived passwords are ASCII, so SASLprep leaves them unchanged.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )
