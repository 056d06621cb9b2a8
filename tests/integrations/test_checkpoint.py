"""The checkpoint in-process: token verification, the decision table, access keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import event, text

from sqla_tenancy import Tenancy, TenantNotFound
from sqla_tenancy.checkpoint import (
    AccessKeyNotRetrievable,
    Admission,
    AuthenticationRequired,
    Checkpoint,
    CheckpointConfigError,
    HttpAnswer,
    InvalidToken,
    JWTVerifier,
    TenantMismatch,
    admit,
    bearer_token,
    get_access_key,
    http_answer,
    issue_access_key,
    revoke_access_key,
    rotate_access_key,
    verify_access_key,
)
from sqla_tenancy.context import current_is_anonymous, current_tenant_ref
from sqla_tenancy.registry import conninfo_kwargs
from sqla_tenancy.resolvers import (
    HeaderResolver,
    RequestView,
    TenantNotResolved,
    TenantUnavailable,
    UnknownTenant,
)
from tests.models import INFRASTRUCTURE, Base

from .conftest import SECRET, World, make_token


def request(tenant: str | None = None, *, token: str | None = None, key: str | None = None) -> RequestView:
    headers = []
    if tenant is not None:
        headers.append(("X-Tenant-ID", tenant))
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    if key is not None:
        headers.append(("X-Tenant-Access-Key", key))
    return RequestView.from_pairs("GET", "/projects", "api.example.com", headers)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- verifier configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithms": ["none"]}, "not accepted"),
        ({"algorithms": ["HS256", "none"]}, "not accepted"),
        ({"algorithms": []}, "at least one"),
        ({"algorithms": "HS256"}, "must be a list"),
        ({"algorithms": ["HS256", "RS256"]}, "mix signature families"),
        ({"algorithms": ["HS256"], "key": None}, "either key"),
        ({"algorithms": ["HS256"], "key": "short"}, "at least 32"),
        ({"algorithms": ["HS512"], "key": SECRET}, "at least 64"),
    ],
)
def test_unsafe_verifier_configurations_are_refused(kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("key", SECRET)
    with pytest.raises(CheckpointConfigError, match=message):
        JWTVerifier(**kwargs)


def test_a_public_key_cannot_be_configured_as_an_hmac_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(CheckpointConfigError, match="does not suit HS256"):
        JWTVerifier(public_pem(rsa_key), algorithms=["HS256"])


def test_a_key_of_the_wrong_type_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(CheckpointConfigError, match="does not suit ES256"):
        JWTVerifier(public_pem(rsa_key), algorithms=["ES256"])


def test_a_checkpoint_that_could_admit_nobody_is_refused() -> None:
    with pytest.raises(CheckpointConfigError, match="could admit no request"):
        Checkpoint(access_key_header=None)


# -- verification -----------------------------------------------------------------------------------


def test_rs256_tokens_verify_with_the_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode({"tenant": "acme", "exp": time.time() + 60}, rsa_key, algorithm="RS256")
    assert JWTVerifier(public_pem(rsa_key), algorithms=["RS256"]).verify(token)["tenant"] == "acme"
    # a private key is reduced to its public half
    assert JWTVerifier(rsa_key, algorithms=["RS256", "PS256"]).verify(token)["tenant"] == "acme"


def test_algorithm_confusion_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """An HS256 token whose 'secret' is the (public) RSA key must not verify."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    pem = public_pem(rsa_key)
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + b"."
        + b64(json.dumps({"tenant": "acme", "exp": time.time() + 60}).encode())
    )
    forged = (signing_input + b"." + b64(hmac.new(pem, signing_input, hashlib.sha256).digest())).decode()
    with pytest.raises(InvalidToken, match="InvalidAlgorithmError"):
        JWTVerifier(pem, algorithms=["RS256"]).verify(forged)


def test_es256_tokens_verify() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"tenant": "acme", "exp": time.time() + 60}, key, algorithm="ES256")
    assert JWTVerifier(public_pem(key), algorithms=["ES256"]).verify(token)["tenant"] == "acme"


def test_keys_by_kid_allow_rotation() -> None:
    old, new = SECRET, SECRET[::-1]
    verifier = JWTVerifier(keys={"2024": old, "2025": new}, algorithms=["HS256"])
    assert verifier.verify(make_token(key=new, headers={"kid": "2025"}))["tenant"] == "acme"
    assert verifier.verify(make_token(key=old, headers={"kid": "2024"}))["tenant"] == "acme"
    with pytest.raises(InvalidToken, match="InvalidSignatureError"):
        verifier.verify(make_token(key=old, headers={"kid": "2025"}))
    with pytest.raises(InvalidToken, match="unknown key id"):
        verifier.verify(make_token(key=new, headers={"kid": "2026"}))
    with pytest.raises(InvalidToken, match="unknown key id"):
        verifier.verify(make_token(key=new))


def test_leeway_tolerates_small_clock_skew() -> None:
    token = make_token(expires_in=-5)
    with pytest.raises(InvalidToken, match="ExpiredSignatureError"):
        JWTVerifier(SECRET, algorithms=["HS256"]).verify(token)
    assert JWTVerifier(SECRET, algorithms=["HS256"], leeway=30).verify(token)["tenant"] == "acme"


def test_audience_issuer_and_expiry_are_enforced() -> None:
    verifier = JWTVerifier(SECRET, algorithms=["HS256"], audience="api", issuer="https://id.example.com")
    assert verifier.verify(make_token(aud="api", iss="https://id.example.com"))
    for token in (
        make_token(aud="other", iss="https://id.example.com"),
        make_token(aud="api", iss="https://evil.example.com"),
        make_token(iss="https://id.example.com"),
        make_token(aud="api"),
        jwt.encode(
            {"tenant": "acme", "aud": "api", "iss": "https://id.example.com"}, SECRET, algorithm="HS256"
        ),
    ):
        with pytest.raises(InvalidToken):
            verifier.verify(token)


# -- the decision table -----------------------------------------------------------------------------


def test_decisions_for_bearer_tokens(world: World) -> None:
    checkpoint = Checkpoint(verifier=JWTVerifier(SECRET, algorithms=["HS256"]))
    t = world.tenancy
    admission = checkpoint.admit(t, request("acme", token=make_token("acme")))
    assert (admission.tenant.slug, admission.credential, admission.is_anonymous) == ("acme", "token", False)
    assert admission.claims is not None and admission.claims["sub"] == "user-1"
    with pytest.raises(TenantMismatch):
        checkpoint.admit(t, request("globex", token=make_token("acme")))
    with pytest.raises(TenantMismatch):
        checkpoint.admit(t, request("acme", token=make_token("ghost")))
    with pytest.raises(UnknownTenant):
        checkpoint.admit(t, request("ghost", token=make_token("ghost")))
    with pytest.raises(TenantUnavailable):
        checkpoint.admit(t, request("initech", token=make_token("initech")))
    with pytest.raises(InvalidToken):
        checkpoint.admit(t, RequestView.from_pairs("GET", "/", "h", [("Authorization", "Bearer ")]))
    # another scheme is not a bearer token: the request is unauthenticated
    with pytest.raises(AuthenticationRequired):
        checkpoint.admit(
            t, RequestView.from_pairs("GET", "/", "h", [("Authorization", "Basic dXNlcjpwdw==")])
        )


def test_a_request_naming_no_tenant_without_a_default_is_400(world: World) -> None:
    tenancy = world.make_tenancy(default_tenant=None)
    checkpoint = Checkpoint(verifier=JWTVerifier(SECRET, algorithms=["HS256"]))
    header_only = [HeaderResolver()]
    with pytest.raises(TenantNotResolved) as raised:
        checkpoint.admit(tenancy, request(token=make_token("acme")), header_only)
    answer = http_answer(raised.value)
    assert answer is not None and (answer.status, answer.body()["error"]) == (400, "tenant_required")
    with pytest.raises(TenantNotResolved):
        checkpoint.admit(tenancy, request(key=world.access_keys["acme"]))
    with pytest.raises(TenantNotResolved):
        admit(tenancy, request(), checkpoint=None)
    # with the claim resolver (the default) the token names the tenant
    assert checkpoint.admit(tenancy, request(token=make_token("acme"))).tenant.slug == "acme"


def test_a_request_naming_no_tenant_gets_the_default_when_there_is_one(world: World) -> None:
    admission = admit(world.tenancy, request(), checkpoint=None)
    assert (admission.tenant.slug, admission.credential) == ("default", "none")
    keyed = Checkpoint().admit(world.tenancy, request(key=world.access_keys["default"]))
    assert (keyed.tenant.slug, keyed.is_anonymous) == ("default", True)


def test_without_a_checkpoint_only_resolution_applies(world: World) -> None:
    assert admit(world.tenancy, request("globex"), checkpoint=None).tenant.slug == "globex"
    with pytest.raises(UnknownTenant) as unknown:
        admit(world.tenancy, request("nosuchtenant"), checkpoint=None)
    assert http_answer(unknown.value) == HttpAnswer(404, "tenant_not_found", "Unknown tenant.", {})
    with pytest.raises(TenantUnavailable) as suspended:
        admit(world.tenancy, request("initech"), checkpoint=None)
    assert http_answer(suspended.value) == HttpAnswer(
        403, "tenant_suspended", "This tenant is suspended.", {}
    )
    with pytest.raises(UnknownTenant):
        admit(world.tenancy, request("x" * 500), checkpoint=None)


def test_a_checkpoint_without_verifier_ignores_bearer_tokens(world: World) -> None:
    checkpoint = Checkpoint()
    with pytest.raises(AuthenticationRequired):
        checkpoint.admit(world.tenancy, request("acme", token=make_token("acme")))
    keyed = checkpoint.admit(world.tenancy, request("acme", key=world.access_keys["acme"]))
    assert keyed.credential == "access_key"


def test_the_database_role_follows_the_credential(world: World) -> None:
    """A token gets the tenant's full role; an access key or no credential the anonymous one;
    no checkpoint at all (the application authenticates elsewhere) keeps the full role."""
    t = world.tenancy
    token = Checkpoint(verifier=JWTVerifier(SECRET, algorithms=["HS256"]))
    cases = {
        "token": token.admit(t, request("acme", token=make_token("acme"))),
        "access_key": Checkpoint().admit(t, request("acme", key=world.access_keys["acme"])),
        "no credential": Checkpoint(require_auth=False).admit(t, request("acme")),
        "no checkpoint": admit(t, request("acme"), checkpoint=None),
    }
    roles = {name: admission.database_role for name, admission in cases.items()}
    assert roles == {
        "token": "full",
        "access_key": "anonymous",
        "no credential": "anonymous",
        "no checkpoint": "full",
    }
    for name, admission in cases.items():
        with admission.context():
            assert current_tenant_ref() == admission.tenant.id
            assert current_is_anonymous() == (roles[name] == "anonymous")
    with pytest.raises(ValueError, match="database_role"):
        Admission(cases["token"].tenant, "token", database_role="admin")  # type: ignore[arg-type]


def test_refusals_tell_logs_more_than_clients(world: World) -> None:
    with pytest.raises(AuthenticationRequired) as raised:
        Checkpoint().admit(world.tenancy, request("acme", key=str(uuid.uuid4())))
    assert "acme" in str(raised.value)
    answer = http_answer(raised.value)
    assert answer is not None and answer.status == 401
    assert "acme" not in json.dumps(answer.body())


# -- access keys ------------------------------------------------------------------------------------


def spellings(key: uuid.UUID) -> list[str]:
    """Other spellings of ``key`` that ``uuid.UUID()`` would accept: none of them is the key."""
    return [
        str(key).upper(),
        "{" + str(key) + "}",
        f"urn:uuid:{key}",
        key.hex,
        f" {key}",
        f"{key}\n",
    ]


def test_a_tenant_has_no_access_key_until_one_is_issued(world: World) -> None:
    world.tenancy.create_tenant("umbrella")
    for presented in (str(uuid.uuid4()), "00000000-0000-0000-0000-000000000000"):
        assert not verify_access_key(world.tenancy, "umbrella", presented)
        with pytest.raises(AuthenticationRequired):
            Checkpoint().admit(world.tenancy, request("umbrella", key=presented))


def test_an_issued_key_admits_until_it_is_rotated_or_revoked(world: World) -> None:
    world.tenancy.create_tenant("wayne")
    first = issue_access_key(world.tenancy, "wayne")
    assert verify_access_key(world.tenancy, "wayne", str(first))
    assert Checkpoint().admit(world.tenancy, request("wayne", key=str(first))).tenant.slug == "wayne"
    for presented in spellings(first):
        assert not verify_access_key(world.tenancy, "wayne", presented), presented
        with pytest.raises(AuthenticationRequired):
            Checkpoint().admit(world.tenancy, request("wayne", key=presented))
    # another tenant's key opens only that tenant
    assert not verify_access_key(world.tenancy, "acme", str(first))
    with pytest.raises(AuthenticationRequired):
        Checkpoint().admit(world.tenancy, request("acme", key=str(first)))
    second = rotate_access_key(world.tenancy, world.tenancy.get_tenant("wayne"))  # by Tenant, too
    assert second != first
    assert not verify_access_key(world.tenancy, "wayne", str(first))
    with pytest.raises(AuthenticationRequired):
        Checkpoint().admit(world.tenancy, request("wayne", key=str(first)))
    assert Checkpoint().admit(world.tenancy, request("wayne", key=str(second))).tenant.slug == "wayne"
    revoke_access_key(world.tenancy, "wayne")
    assert not verify_access_key(world.tenancy, "wayne", str(second))
    with pytest.raises(AuthenticationRequired):
        Checkpoint().admit(world.tenancy, request("wayne", key=str(second)))


def test_access_key_functions_on_unknown_tenants(world: World) -> None:
    assert not verify_access_key(world.tenancy, "nosuchtenant", str(uuid.uuid4()))
    assert not verify_access_key(world.tenancy, "nosuchtenant", world.access_keys["acme"])
    assert not verify_access_key(world.tenancy, "acme", "not-a-uuid")
    for call in (issue_access_key, rotate_access_key, revoke_access_key):
        with pytest.raises(TenantNotFound):
            call(world.tenancy, "nosuchtenant")
        with pytest.raises(TenantNotFound):
            call(world.tenancy, uuid.uuid4())


def test_an_access_key_cannot_be_read_back(world: World) -> None:
    with pytest.raises(AccessKeyNotRetrievable, match="issue_access_key"):
        get_access_key(world.tenancy, "acme")


def app_role(tenancy: Tenancy) -> psycopg.Connection[tuple[object, ...]]:
    """A plain connection of the application role (no tenant bound)."""
    return psycopg.connect(autocommit=True, **conninfo_kwargs(tenancy.url))


def test_the_application_role_can_read_no_access_key(world: World) -> None:
    """Whatever SQL the application role runs, it cannot list the keys or their hashes; it can
    read the registry columns it routes with, and have a key verified."""
    acme = world.tenants["acme"]
    with app_role(world.tenancy) as conn:
        for sql in (
            "select * from tenancy.tenants",
            "select slug, access_key_hash from tenancy.tenants",
            "select t::text from tenancy.tenants t",
            "select to_jsonb(t) from tenancy.tenants t",
            "select count(*) from tenancy.tenants where access_key_hash is not null",
            "copy tenancy.tenants to stdout",
            "copy (select access_key_hash from tenancy.tenants) to stdout",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        with pytest.raises(psycopg.errors.UndefinedColumn):  # no plain key is stored at all
            conn.execute("select access_key from tenancy.tenants")
        slugs = {row[0] for row in conn.execute("select slug from tenancy.tenants")}
        assert {"acme", "globex", "default"} <= slugs
        owner = conn.execute("select tenancy.access_key_tenant(%s)", (uuid.UUID(world.access_keys["acme"]),))
        assert owner.fetchone() == (acme.id,)
        assert conn.execute("select tenancy.access_key_tenant(%s)", (uuid.uuid4(),)).fetchone() == (None,)
        public = conn.execute(
            "select has_function_privilege('public', 'tenancy.access_key_tenant(uuid)', 'EXECUTE'), "
            "has_table_privilege('public', 'tenancy.tenants', 'SELECT')"
        ).fetchone()
        assert public == (False, False)


def test_the_registry_stores_only_the_hash_of_a_key(world: World) -> None:
    key = uuid.UUID(world.access_keys["globex"])
    with world.tenancy.admin_engine.connect() as conn:
        row = conn.execute(text("select t::text from tenancy.tenants t where slug = 'globex'")).scalar_one()
        stored = conn.execute(
            text("select access_key_hash from tenancy.tenants where slug = 'globex'")
        ).scalar()
    assert str(key) not in row and key.hex not in row
    assert stored == hashlib.sha256(key.bytes).digest()


def test_issuing_a_key_sends_only_its_hash_to_the_server(world: World) -> None:
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        sent.append(f"{statement} {parameters!r}")

    world.tenancy.create_tenant("stark")
    event.listen(world.tenancy.admin_engine, "before_cursor_execute", record)
    try:
        key = issue_access_key(world.tenancy, "stark")
    finally:
        event.remove(world.tenancy.admin_engine, "before_cursor_execute", record)
    assert verify_access_key(world.tenancy, "stark", str(key))
    assert sent and not any(str(key) in s or key.hex in s or repr(key) in s for s in sent)


def test_an_earlier_registry_is_migrated_to_hashed_keys(tenancy_factory: Any) -> None:
    """A registry made by an earlier version (plain keys the application role could read) is
    migrated by install(): the keys in use keep working, and nobody but the admin reads them."""
    tenancy: Tenancy = tenancy_factory(Base.metadata, infrastructure_schemas=INFRASTRUCTURE)
    tenancy.install()
    tenancy.create_tenant("acme")
    app = quote(tenancy.url.username)
    with tenancy.admin_engine.begin() as conn:  # what the earlier version made
        conn.exec_driver_sql("alter table tenancy.tenants drop column access_key_hash")
        conn.exec_driver_sql(
            "alter table tenancy.tenants add column access_key uuid not null default gen_random_uuid()"
        )
        conn.exec_driver_sql(f"grant select on tenancy.tenants to {app}")
        conn.exec_driver_sql("drop function tenancy.access_key_tenant(uuid)")
        old = conn.execute(text("select access_key from tenancy.tenants where slug = 'acme'")).scalar_one()
    with app_role(tenancy) as conn:
        assert conn.execute("select access_key from tenancy.tenants where slug = 'acme'").fetchone() == (old,)
    tenancy.install()
    tenancy.install()  # idempotent
    assert verify_access_key(tenancy, "acme", str(old))
    assert Checkpoint().admit(tenancy, request("acme", key=str(old))).tenant.slug == "acme"
    assert not verify_access_key(tenancy, "default", str(uuid.uuid4()))
    with app_role(tenancy) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select * from tenancy.tenants")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select access_key_hash from tenancy.tenants")
        assert conn.execute("select slug from tenancy.tenants where slug = 'acme'").fetchone() == ("acme",)
    with tenancy.admin_engine.connect() as conn:
        columns = set(
            conn.execute(
                text("select column_name from information_schema.columns where table_name = 'tenants'")
            ).scalars()
        )
    assert "access_key" not in columns and "access_key_hash" in columns
    new = issue_access_key(tenancy, "acme")
    assert verify_access_key(tenancy, "acme", str(new)) and not verify_access_key(tenancy, "acme", str(old))


def quote(name: str | None) -> str:
    assert name
    return '"' + name.replace('"', '""') + '"'


# -- bearer tokens as sent ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),  # the scheme is case-insensitive (RFC 7235)
        ("Bearer   abc.def.ghi", "abc.def.ghi"),  # one or more spaces (RFC 6750)
        ("Basic dXNlcjpwdw==", None),  # another scheme: no token
        ("Bearerabc", None),
        ("Bearer\tabc", None),
    ],
)
def test_bearer_tokens_are_read_as_rfc_6750_writes_them(value: str, expected: str | None) -> None:
    view = RequestView.from_pairs("GET", "/", "h", [("Authorization", value)])
    assert bearer_token(view) == expected


@pytest.mark.parametrize(
    "value",
    ["Bearer ", "Bearer abc.def.ghi ", "Bearer abc.def.ghi\n", "Bearer abc def", "Bearer a\x00b", "Bearer é"],
)
def test_a_bearer_token_with_anything_around_or_inside_it_is_invalid(value: str) -> None:
    view = RequestView.from_pairs("GET", "/", "h", [("Authorization", value)])
    with pytest.raises(InvalidToken):
        bearer_token(view)
