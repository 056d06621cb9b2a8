"""The statements that bind one transaction to one tenant, for every placement.

A connection of the application's pool serves many tenants in turn, and code running inside a
tenant's transaction can change session-level state that outlives it (``SET search_path``,
``SET ROLE``, ``SET app.current_tenant_id`` without ``LOCAL``: a common tutorial pattern). So every
binding pins, transaction-locally, *all* the state that decides where names resolve and as whom,
not only the part its own placement uses:

* ``search_path``: the tenant's schema followed by ``pg_temp`` (schema placement; listing
  ``pg_temp`` last stops a temporary table from shadowing the tenant's tables, which it would
  do from its implicit first place), or ``DEFAULT``, the value the connection started with;
* the role: the tenant's role (schema placement), an anonymous role, or ``NONE``, the login role;
* ``app.current_tenant_id``: the tenant's id, for the row-level security policies.

What a transaction leaves behind besides settings (temporary tables, holdable cursors, ``LISTEN``,
session advisory locks) is cleared by the dialect (:data:`CLEAR_LEFTOVERS`).
"""

from __future__ import annotations

import uuid

from .identifiers import quote_ident, quote_literal
from .registry import REGISTRY_SCHEMA
from .rls import TENANT_SETTING

#: ``tenancy.admit_tenant(uuid)`` in the main database: refuses a tenant that is not active and
#: holds the tenant's serving lock (shared) for the transaction (see :func:`admit_statement`).
ADMIT_FUNCTION = f"{REGISTRY_SCHEMA}.admit_tenant"
#: ``tenancy.admit(uuid, text)``, the procedure the bindings ``CALL`` since it exists (the same
#: check, cheaper for the server: see :func:`admit_statement`); the functions stay for processes
#: of earlier versions.
ADMIT_PROCEDURE = f"{REGISTRY_SCHEMA}.admit"
#: The SQLSTATE of its refusal (the dialect turns it into :class:`~sqla_tenancy.TenantRefused`).
REFUSED_SQLSTATE = "TNREF"

__all__ = [
    "ADMIT_FUNCTION",
    "ADMIT_PROCEDURE",
    "PROPAGATE_OPTION",
    "SEPARATE_BINDING",
    "CLEAR_LEFTOVERS",
    "REFUSED_SQLSTATE",
    "UNBIND",
    "admit_statement",
    "admitted_binding",
    "distributed_binding_statement",
    "binding_statement",
    "migration_binding_statement",
    "tenant_setting",
]

#: Sent in front of a tenant's ``BEGIN``: removes what another transaction on the same connection
#: may have left for the next one to find. Each statement is a no-op on a clean connection. They
#: run (and ``COMMIT``) in a transaction of their own: in front of ``BEGIN`` in the same message
#: they would join the tenant's transaction, where ``UNLISTEN`` waits for its commit and a
#: rollback would bring the dropped temporary tables back.
CLEAR_LEFTOVERS = b"CLOSE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; COMMIT"


#: Citus (sqla_tenancy.distribution): the application engines' sessions propagate ``SET LOCAL`` to
#: the workers (a connection option)
PROPAGATE_OPTION = "-c citus.propagate_set_commands=local"
#: Citus: what follows this marker in a binding is sent by the dialect as a query of its own, after
#: the rest. Citus replays on the workers the whole query string a propagated ``SET LOCAL`` came in
#: (with a multi-statement binding: the leftover clearing, ``COMMIT; BEGIN``, the admission...),
#: so on Citus the tenant setting travels alone, and the rest of the binding carries no ``SET``.
SEPARATE_BINDING = b"\n-- sqla-tenancy: the rest alone (Citus)\n"


def distributed_binding_statement(
    tenant_id: uuid.UUID, *, schema: str | None = None, role: str | None = None
) -> bytes:
    """A tenant's binding on Citus: the pins as ``set_config`` calls (not propagated), then,
    alone, the tenant setting (propagated to the workers). ``schema`` and ``role`` as for
    :func:`binding_statement` (a schema tenant's; ``None``: the default path, the login role)."""
    path = '"$user", public' if schema is None else f"{quote_ident(schema)}, pg_temp"
    who = "none" if role is None else role
    return (
        f"SELECT pg_catalog.set_config('search_path', {quote_literal(path)}, true), "
        f"pg_catalog.set_config('role', {quote_literal(who)}, true)".encode()
        + SEPARATE_BINDING
        + tenant_setting(tenant_id).encode()
    )


def tenant_setting(tenant_id: uuid.UUID) -> str:
    """``SET LOCAL app.current_tenant_id = '<id>'``."""
    return f"SET LOCAL {TENANT_SETTING} = {quote_literal(str(tenant_id))}"


#: How the admission (:func:`admit_statement`) starts, and how every binding of the login role's
#: own default path does (:func:`binding_statement` with no schema and no role), which the
#: admission may then follow with nothing to reset (:func:`admitted_binding`): one definition
#: each, so that the forms cannot drift apart.
_RESET_ROLE_SQL = "SET LOCAL ROLE NONE"
_RESET_ROLE = f"{_RESET_ROLE_SQL}; ".encode()
_DEFAULT_PINS = b"SET LOCAL search_path = DEFAULT; " + _RESET_ROLE


def binding_statement(tenant_id: uuid.UUID, *, schema: str | None = None, role: str | None = None) -> bytes:
    """The ``SET LOCAL`` statements that bind a transaction to the tenant ``tenant_id``.

    ``schema``: the only schema unqualified names resolve in (``None``: the connection's default
    ``search_path``). ``role``: the role the transaction runs as (``None``: the login role).
    """
    if schema is None and role is None:  # the form admitted_binding() recognises
        return _DEFAULT_PINS + tenant_setting(tenant_id).encode()
    path = "DEFAULT" if schema is None else f"{quote_ident(schema)}, pg_temp"
    who = "NONE" if role is None else quote_ident(role)
    return f"SET LOCAL search_path = {path}; SET LOCAL ROLE {who}; {tenant_setting(tenant_id)}".encode()


def admit_statement(
    tenant_id: uuid.UUID, *, placement: str | None = None, distributed: bool = False, call: bool = False
) -> bytes:
    """The first statements of a main-database tenant transaction's binding: the database itself
    refuses a tenant that is suspended, being deleted or gone (whatever a process's registry cache
    says), and a deletion waits for the transactions it admitted (:func:`locks.serving_key
    <sqla_tenancy.locks.serving_key>`). It runs as the login role (the application role, which may
    execute it): a ``SET ROLE`` left on the connection by earlier code is reset first, as the rest
    of the binding resets it. With ``placement``, the tenant must also still be of that placement
    (a process whose cache predates a move is refused rather than write where the tenant was).

    ``call``: ``CALL tenancy.admit(...)`` (a utility statement: no plan, no result row, one
    query inside), as a main database installed by this version allows; otherwise
    ``SELECT tenancy.admit_tenant(...)``, the function earlier versions installed."""
    reset = "SELECT pg_catalog.set_config('role', 'none', true)" if distributed else _RESET_ROLE_SQL
    if call and placement is not None:
        admit = f"CALL {ADMIT_PROCEDURE}({quote_literal(str(tenant_id))}, {quote_literal(placement)})"
    else:
        where = "" if placement is None else f", {quote_literal(placement)}"
        admit = f"SELECT {ADMIT_FUNCTION}({quote_literal(str(tenant_id))}{where})"
    return f"{reset}; {admit}".encode()


def admitted_binding(admission: bytes, binding: bytes) -> bytes:
    """``binding`` preceded by ``admission`` (:func:`admit_statement`), in one query.

    A binding that pins the default path and the login role anyway (the shared placement's)
    does so first and the admission follows it without a ``SET ROLE`` of its own; any other (a
    schema tenant's role, an anonymous role, Citus's ``set_config`` form) follows the
    admission, which resets the role itself."""
    if binding.startswith(_DEFAULT_PINS) and admission.startswith(_RESET_ROLE):
        return _DEFAULT_PINS + admission[len(_RESET_ROLE) :] + b"; " + binding[len(_DEFAULT_PINS) :]
    return admission + b"; " + binding


def migration_binding_statement(tenant_id: uuid.UUID, *, schema: str | None = None) -> str:
    """What binds an admin transaction migrating a tenant's location: unqualified names resolve in
    ``schema`` (``None``: the default path), and the policies see the tenant. The role stays the
    admin's: migrations own the tables."""
    path = "DEFAULT" if schema is None else quote_ident(schema)
    return f"SET LOCAL search_path = {path}; {tenant_setting(tenant_id)}"


#: Undoes :func:`migration_binding_statement` for the rest of a caller's transaction.
UNBIND = f"SET LOCAL search_path = DEFAULT; SET LOCAL {TENANT_SETTING} = ''"
