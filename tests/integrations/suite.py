"""What every web integration must do, written once; each framework's test module subclasses
:class:`CheckpointSuite` and says how to build and serve its application.

Every test drives a real server over HTTP and checks what PostgreSQL returned or was never asked.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, ClassVar

import httpx
import pytest
from sqlalchemy import Engine, event

from sqla_tenancy import Tenancy
from sqla_tenancy.checkpoint import AuthenticationRequired, Checkpoint, JWTVerifier
from sqla_tenancy.resolvers import ClaimResolver, PathPrefixResolver, TenantResolver
from tests.live_server import LiveServer

from .conftest import OTHER_SECRET, SECRET, SEEDS, World, bearer, make_token

AppBuilder = Callable[..., Any]


def strict_checkpoint() -> Checkpoint:
    return Checkpoint(verifier=JWTVerifier(SECRET, algorithms=["HS256"]))


def open_checkpoint() -> Checkpoint:
    return Checkpoint(verifier=JWTVerifier(SECRET, algorithms=["HS256"]), require_auth=False)


def assert_only(slug: str, body: dict[str, Any]) -> None:
    """The response is the tenant's, and holds its seeded rows and nobody else's."""
    assert body["tenant"] == slug, body
    assert all(name.startswith(f"{slug}-") for name in body["names"]), body
    assert set(SEEDS.get(slug, [])) <= set(body["names"]), body


def unsigned_token(claims: dict[str, Any]) -> str:
    """A token with ``alg: none`` and no signature."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@contextmanager
def no_database_work(tenancy: Tenancy) -> Iterator[list[str]]:
    """Records every connection checkout and statement on the application's engines."""
    seen: list[str] = []
    engines: list[Engine] = [tenancy.engine, tenancy.async_engine.sync_engine]

    def on_checkout(*args: Any) -> None:
        seen.append("checkout")

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    for engine in engines:
        event.listen(engine.pool, "checkout", on_checkout)
        event.listen(engine, "before_cursor_execute", on_statement)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine.pool, "checkout", on_checkout)
            event.remove(engine, "before_cursor_execute", on_statement)


class CheckpointSuite:
    """Subclasses set ``build`` (tenancy, checkpoint, resolvers=...) -> app and ``serve``."""

    build: ClassVar[AppBuilder]
    serve: ClassVar[Callable[[Any], LiveServer]]
    #: routes answering with the tenant's projects
    project_paths: ClassVar[Sequence[str]] = ("/projects",)

    @classmethod
    def _server(
        cls, world: World, checkpoint: Checkpoint, resolvers: Sequence[TenantResolver] | None = None
    ) -> LiveServer:
        app = cls.build(world.tenancy, checkpoint, resolvers=resolvers)
        return cls.serve(app)

    @pytest.fixture(scope="class")
    @classmethod
    def strict(cls, world: World) -> Iterator[httpx.Client]:
        server = cls._server(world, strict_checkpoint())
        with server.client() as client:
            yield client
        server.stop()

    @pytest.fixture(scope="class")
    @classmethod
    def open_(cls, world: World) -> Iterator[httpx.Client]:
        server = cls._server(world, open_checkpoint())
        with server.client() as client:
            yield client
        server.stop()

    @pytest.fixture(scope="class")
    @classmethod
    def by_path(cls, world: World) -> Iterator[httpx.Client]:
        server = cls._server(
            world, strict_checkpoint(), resolvers=[PathPrefixResolver("/t/"), ClaimResolver()]
        )
        with server.client() as client:
            yield client
        server.stop()

    # -- isolation --------------------------------------------------------------------------

    def test_each_tenant_sees_only_its_own_rows(self, strict: httpx.Client, world: World) -> None:
        for slug in ("acme", "globex", "hooli"):
            for path in self.project_paths:
                response = strict.get(path, headers={"X-Tenant-ID": slug, **bearer(make_token(slug))})
                assert response.status_code == 200, response.text
                body = response.json()
                assert_only(slug, body)
                assert body["credential"] == "token" and body["anonymous"] is False
                assert body["ref"] == str(world.tenants[slug].id)

    def test_the_token_claim_names_the_tenant_when_the_request_does_not(self, strict: httpx.Client) -> None:
        response = strict.get("/projects", headers=bearer(make_token("globex")))
        assert response.status_code == 200
        assert_only("globex", response.json())

    def test_tenant_may_be_named_by_uuid(self, strict: httpx.Client, world: World) -> None:
        acme = world.tenants["acme"]
        response = strict.get(
            "/projects", headers={"X-Tenant-ID": str(acme.id), **bearer(make_token("acme"))}
        )
        assert response.status_code == 200
        assert_only("acme", response.json())
        # ...in the claim too: compared by id, not by spelling
        response = strict.get(
            "/projects", headers={"X-Tenant-ID": "acme", **bearer(make_token(str(acme.id)))}
        )
        assert response.status_code == 200
        assert_only("acme", response.json())

    def test_concurrent_requests_for_different_tenants_never_mix(self, strict: httpx.Client) -> None:
        slugs = ["acme", "globex", "hooli"]
        tokens = {slug: make_token(slug) for slug in slugs}
        jobs = [(slugs[i % 3], self.project_paths[i % len(self.project_paths)]) for i in range(60)]

        def call(job: tuple[str, str]) -> tuple[str, httpx.Response]:
            slug, path = job
            return slug, strict.get(path, headers={"X-Tenant-ID": slug, **bearer(tokens[slug])})

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(call, jobs))
        for slug, response in results:
            assert response.status_code == 200, response.text
            assert_only(slug, response.json())

    # -- one tenant per name ----------------------------------------------------------------

    @pytest.mark.parametrize(
        "claim",
        [
            "acme\n",
            "acme ",
            " acme",
            "\tacme",
            "ac me",
            "ACME",
            "Acme",
            "\uff41cme",
            "acme\x00",
            "upper-uuid",
        ],
    )
    def test_a_signed_token_for_another_spelling_of_a_tenant_is_not_that_tenant(
        self, strict: httpx.Client, world: World, claim: str
    ) -> None:
        """The token is correctly signed; its claim is not acme's slug or id as written, so it
        names no tenant: not acme, whether the request names acme or only carries the token."""
        if claim == "upper-uuid":
            claim = str(world.tenants["acme"].id).upper()
        token = bearer(make_token(claim))
        own = strict.get("/projects", headers=token)
        assert (own.status_code, own.json()["error"]) == (404, "tenant_not_found"), own.text
        aimed = strict.get("/projects", headers={"X-Tenant-ID": "acme", **token})
        assert (aimed.status_code, aimed.json()["error"]) == (403, "tenant_mismatch"), aimed.text
        for response in (own, aimed):
            assert "acme-1" not in response.text

    @pytest.mark.parametrize(
        "ref",
        [
            "ACME",
            "Acme",
            "ac me",
            "acme\t.",
            "acme,acme",
            "%61cme",
            "upper-uuid",
            "braced-uuid",
            "urn-uuid",
            "hex-uuid",
        ],
    )
    def test_a_header_spelling_a_tenant_otherwise_names_no_tenant(
        self, strict: httpx.Client, open_: httpx.Client, world: World, ref: str
    ) -> None:
        acme = world.tenants["acme"].id
        ref = {
            "upper-uuid": str(acme).upper(),
            "braced-uuid": "{" + str(acme) + "}",
            "urn-uuid": f"urn:uuid:{acme}",
            "hex-uuid": acme.hex,
        }.get(ref, ref)
        with_token = strict.get("/projects", headers={"X-Tenant-ID": ref, **bearer(make_token("acme"))})
        assert (with_token.status_code, with_token.json()["error"]) == (403, "tenant_mismatch")
        keyed = strict.get(
            "/projects", headers={"X-Tenant-ID": ref, "X-Tenant-Access-Key": world.access_keys["acme"]}
        )
        assert (keyed.status_code, keyed.json()["error"]) == (401, "unauthorized")
        anonymous = open_.get("/projects", headers={"X-Tenant-ID": ref})
        assert (anonymous.status_code, anonymous.json()["error"]) == (404, "tenant_not_found")
        for response in (with_token, keyed, anonymous):
            assert "acme-1" not in response.text

    def test_repeated_tenant_headers_name_no_tenant(self, open_: httpx.Client, strict: httpx.Client) -> None:
        for values in (["acme", "acme"], ["acme", "globex"]):
            headers = [("X-Tenant-ID", value) for value in values]
            response = open_.get("/projects", headers=headers)
            assert (response.status_code, response.json()["error"]) == (404, "tenant_not_found")
            response = strict.get("/projects", headers=[*headers, *bearer(make_token("acme")).items()])
            assert (response.status_code, response.json()["error"]) == (403, "tenant_mismatch")

    def test_an_empty_tenant_header_is_refused_not_the_default_tenant(
        self, open_: httpx.Client, strict: httpx.Client
    ) -> None:
        """A header that is present names a tenant, even when empty. (Whitespace-only values
        arrive empty too: HTTP clients refuse to send them, servers strip them.)"""
        response = open_.get("/projects", headers={"X-Tenant-ID": ""})
        assert (response.status_code, response.json()["error"]) == (404, "tenant_not_found")
        response = strict.get("/projects", headers={"X-Tenant-ID": "", **bearer(make_token("default"))})
        assert (response.status_code, response.json()["error"]) == (403, "tenant_mismatch")

    @pytest.mark.parametrize("segment", ["ACME", "acme%0A", "acme%20", "%20acme", "acme%00", "acme.", ""])
    def test_a_path_segment_spelling_a_tenant_otherwise_names_no_tenant(
        self, by_path: httpx.Client, world: World, segment: str
    ) -> None:
        """The segment is read from the decoded path the framework routes on, as it is. (Flask
        answers ``/t//projects`` with its own 404 before any tenant is resolved.)"""
        path = f"/t/{segment}/projects"
        with_token = by_path.get(path, headers=bearer(make_token("acme")))
        assert with_token.status_code in ((403, 404) if not segment else (403,)), with_token.text
        keyed = by_path.get(path, headers={"X-Tenant-Access-Key": world.access_keys["acme"]})
        assert keyed.status_code in ((401, 404) if not segment else (401,)), keyed.text
        for response in (with_token, keyed):
            assert "acme-1" not in response.text

    @pytest.mark.parametrize("spelling", ["upper", "braced", "urn", "hex", "padded"])
    def test_only_the_canonical_spelling_of_an_access_key_admits(
        self, strict: httpx.Client, world: World, spelling: str
    ) -> None:
        key = uuid.UUID(world.access_keys["acme"])
        presented = {
            "upper": str(key).upper(),
            "braced": "{" + str(key) + "}",
            "urn": f"urn:uuid:{key}",
            "hex": key.hex,
            "padded": f"{key}\t.",
        }[spelling]
        response = strict.get("/projects", headers={"X-Tenant-ID": "acme", "X-Tenant-Access-Key": presented})
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized")
        assert "acme-1" not in response.text

    # -- the checkpoint: tokens -------------------------------------------------------------

    def test_token_for_another_tenant_is_refused_before_any_query(
        self, strict: httpx.Client, world: World
    ) -> None:
        with no_database_work(world.tenancy) as seen:
            response = strict.get(
                "/projects", headers={"X-Tenant-ID": "globex", **bearer(make_token("acme"))}
            )
        assert response.status_code == 403
        assert response.json()["error"] == "tenant_mismatch"
        assert "globex-1" not in response.text
        assert seen == []

    def test_token_for_another_tenant_is_refused_whether_that_tenant_exists_or_not(
        self, strict: httpx.Client
    ) -> None:
        token = bearer(make_token("acme"))
        existing = strict.get("/projects", headers={"X-Tenant-ID": "globex", **token})
        unknown = strict.get("/projects", headers={"X-Tenant-ID": "nosuchtenant", **token})
        assert (existing.status_code, existing.json()) == (unknown.status_code, unknown.json())

    def test_token_for_an_unknown_tenant_is_404(self, strict: httpx.Client) -> None:
        ghost = bearer(make_token("ghost"))
        for headers in ({"X-Tenant-ID": "ghost", **ghost}, ghost):
            response = strict.get("/projects", headers=headers)
            assert response.status_code == 404
            assert response.json()["error"] == "tenant_not_found"

    def test_token_for_a_suspended_tenant_is_403(self, strict: httpx.Client) -> None:
        response = strict.get(
            "/projects", headers={"X-Tenant-ID": "initech", **bearer(make_token("initech"))}
        )
        assert response.status_code == 403
        assert response.json()["error"] == "tenant_suspended"
        assert "initech-1" not in response.text

    def test_token_without_a_tenant_claim_is_403(self, strict: httpx.Client) -> None:
        response = strict.get("/projects", headers={"X-Tenant-ID": "acme", **bearer(make_token(None))})
        assert response.status_code == 403
        assert response.json()["error"] == "tenant_mismatch"

    @pytest.mark.parametrize(
        "token",
        [
            pytest.param(make_token("acme", expires_in=-60), id="expired"),
            pytest.param(make_token("acme", nbf=9_999_999_999), id="not-yet-valid"),
            pytest.param(unsigned_token({"tenant": "acme", "exp": 9_999_999_999}), id="alg-none"),
            pytest.param(make_token("acme", key=OTHER_SECRET), id="other-key"),
            pytest.param(make_token("acme", algorithm="HS512", key=SECRET * 2), id="algorithm-not-allowed"),
            pytest.param(make_token("acme", aud="another-service"), id="foreign-audience"),
            pytest.param(make_token("acme")[:-4] + "AAAA", id="tampered-signature"),
            pytest.param("not-a-jwt", id="garbage"),
        ],
    )
    def test_invalid_tokens_are_401(self, strict: httpx.Client, world: World, token: str) -> None:
        with no_database_work(world.tenancy) as seen:
            response = strict.get("/projects", headers={"X-Tenant-ID": "acme", **bearer(token)})
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert seen == []

    # -- the checkpoint: unauthenticated requests -------------------------------------------

    def test_unauthenticated_requests_cannot_tell_unknown_tenants_from_forbidden_ones(
        self, strict: httpx.Client, world: World
    ) -> None:
        random_key = str(uuid.uuid4())
        cases = {
            "unknown, no key": {"X-Tenant-ID": "nosuchtenant"},
            "existing, no key": {"X-Tenant-ID": "acme"},
            "suspended, no key": {"X-Tenant-ID": "initech"},
            "unknown uuid, no key": {"X-Tenant-ID": str(uuid.uuid4())},
            "unknown, some key": {"X-Tenant-ID": "nosuchtenant", "X-Tenant-Access-Key": random_key},
            "existing, wrong key": {"X-Tenant-ID": "acme", "X-Tenant-Access-Key": random_key},
            "existing, another tenant's key": {
                "X-Tenant-ID": "acme",
                "X-Tenant-Access-Key": world.access_keys["globex"],
            },
            "suspended, wrong key": {"X-Tenant-ID": "initech", "X-Tenant-Access-Key": random_key},
            "existing, malformed key": {"X-Tenant-ID": "acme", "X-Tenant-Access-Key": "let-me-in"},
            "malformed tenant": {"X-Tenant-ID": "Robert'); DROP TABLE projects;--"},
            "nothing named": {},
        }
        answers = {}
        for name, headers in cases.items():
            with no_database_work(world.tenancy) as seen:
                response = strict.get("/projects", headers=headers)
            assert seen == [], name
            answers[name] = (
                response.status_code,
                response.content,
                response.headers.get("www-authenticate"),
                response.headers.get("content-type"),
            )
        expected = (
            401,
            json.dumps({"error": "unauthorized", "detail": AuthenticationRequired.DETAIL}).encode(),
            "Bearer",
            "application/json",
        )
        assert {name: answer for name, answer in answers.items() if answer != expected} == {}

    def test_the_access_key_admits_anonymous_requests_for_its_tenant(
        self, strict: httpx.Client, world: World
    ) -> None:
        for ref in ("acme", str(world.tenants["acme"].id)):
            response = strict.get(
                "/projects", headers={"X-Tenant-ID": ref, "X-Tenant-Access-Key": world.access_keys["acme"]}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert_only("acme", body)
            assert body["credential"] == "access_key" and body["anonymous"] is True

    def test_anonymous_requests_read_the_opted_in_tables_only(
        self, strict: httpx.Client, open_: httpx.Client, world: World
    ) -> None:
        """An access key (or no credential, where allowed) gets the anonymous database role:
        projects are opted in, tasks are not, and PostgreSQL refuses them. A token gets all."""
        keyed = {"X-Tenant-ID": "hooli", "X-Tenant-Access-Key": world.access_keys["hooli"]}
        for slug, client, headers in (
            ("acme", strict, {"X-Tenant-ID": "acme", "X-Tenant-Access-Key": world.access_keys["acme"]}),
            ("hooli", strict, keyed),  # schema placement
            ("globex", open_, {"X-Tenant-ID": "globex"}),  # require_auth=False, no credential
        ):
            projects = client.get("/projects", headers=headers)
            assert projects.status_code == 200, projects.text
            assert_only(slug, projects.json())
            tasks = client.get("/tasks", headers=headers)
            assert (tasks.status_code, tasks.json()["error"]) == (403, "permission_denied"), tasks.text
            assert "permission denied" in tasks.json()["detail"]
            full = client.get("/tasks", headers={"X-Tenant-ID": slug, **bearer(make_token(slug))})
            assert full.status_code == 200, full.text
            assert full.json()["credential"] == "token"
            assert full.json()["titles"] == sorted(f"{name}-task" for name in SEEDS[slug])

    def test_the_access_key_of_a_suspended_tenant_gets_403(self, strict: httpx.Client, world: World) -> None:
        response = strict.get(
            "/projects",
            headers={"X-Tenant-ID": "initech", "X-Tenant-Access-Key": world.access_keys["initech"]},
        )
        assert response.status_code == 403
        assert response.json()["error"] == "tenant_suspended"

    def test_a_bearer_token_takes_precedence_over_an_access_key(
        self, strict: httpx.Client, world: World
    ) -> None:
        response = strict.get(
            "/projects",
            headers={
                "X-Tenant-ID": "acme",
                "X-Tenant-Access-Key": world.access_keys["acme"],
                **bearer(make_token("globex")),
            },
        )
        assert response.status_code == 403

    # -- require_auth=False -------------------------------------------------------------------

    def test_without_required_auth_a_request_naming_no_tenant_gets_the_default(
        self, open_: httpx.Client
    ) -> None:
        response = open_.get("/projects")
        assert response.status_code == 200
        body = response.json()
        assert (body["tenant"], body["names"], body["anonymous"], body["credential"]) == (
            "default",
            [],
            True,
            "none",
        )

    def test_without_required_auth_unknown_is_404_and_suspended_is_403(self, open_: httpx.Client) -> None:
        unknown = open_.get("/projects", headers={"X-Tenant-ID": "nosuchtenant"})
        assert (unknown.status_code, unknown.json()["error"]) == (404, "tenant_not_found")
        suspended = open_.get("/projects", headers={"X-Tenant-ID": "initech"})
        assert (suspended.status_code, suspended.json()["error"]) == (403, "tenant_suspended")
        acme = open_.get("/projects", headers={"X-Tenant-ID": "acme"})
        assert acme.status_code == 200
        assert_only("acme", acme.json())

    def test_without_required_auth_tokens_are_still_checked(self, open_: httpx.Client) -> None:
        mismatch = open_.get("/projects", headers={"X-Tenant-ID": "globex", **bearer(make_token("acme"))})
        assert mismatch.status_code == 403
        expired = open_.get("/projects", headers=bearer(make_token("acme", expires_in=-60)))
        assert expired.status_code == 401

    # -- other resolvers ----------------------------------------------------------------------

    def test_path_prefix_resolution(self, by_path: httpx.Client, world: World) -> None:
        ok = by_path.get("/t/globex/projects", headers=bearer(make_token("globex")))
        assert ok.status_code == 200
        assert_only("globex", ok.json())
        assert by_path.get("/t/acme/projects", headers=bearer(make_token("globex"))).status_code == 403
        keyed = by_path.get("/t/acme/projects", headers={"X-Tenant-Access-Key": world.access_keys["acme"]})
        assert keyed.status_code == 200
        assert_only("acme", keyed.json())
        # the header resolver is not configured on this app: the path decides
        spoof = by_path.get(
            "/t/acme/projects", headers={"X-Tenant-ID": "globex", **bearer(make_token("acme"))}
        )
        assert spoof.status_code == 200
        assert_only("acme", spoof.json())

    # -- request lifecycle ----------------------------------------------------------------------

    def test_a_streamed_body_keeps_the_tenant(self, strict: httpx.Client, world: World) -> None:
        with strict.stream("GET", "/stream", headers=bearer(make_token("globex"))) as response:
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.iter_lines() if line]
        assert len(lines) == 3
        for line in lines:
            assert line["ref"] == str(world.tenants["globex"].id)
            assert all(name.startswith("globex-") for name in line["names"])
            assert {"globex-1", "globex-2"} <= set(line["names"])

    def test_a_failing_view_leaves_no_tenant_and_no_connection_behind(self, world: World) -> None:
        server = type(self).serve_serially(type(self).build(world.tenancy, strict_checkpoint()))
        try:
            for _ in range(3):
                # a server may drop the connection of a failed request: one client per request
                with server.client() as client:
                    response = client.get("/boom", headers=bearer(make_token("acme")))
                assert response.status_code == 500
                with server.client() as client:
                    probe = client.get("/probe").json()
                assert probe["ref"] == "None"
                assert probe["checked_out"] == 0
        finally:
            server.stop()

    def test_cors_preflights_are_not_refused(self, strict: httpx.Client, world: World) -> None:
        preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"}
        with no_database_work(world.tenancy) as seen:
            response = strict.options("/projects", headers={"X-Tenant-ID": "acme", **preflight})
        assert response.status_code != 401
        assert seen == []
        # a plain OPTIONS request is not a preflight: the checkpoint applies
        assert strict.options("/projects", headers={"X-Tenant-ID": "acme"}).status_code == 401

    def test_exempt_routes_skip_resolution(self, strict: httpx.Client) -> None:
        response = strict.get("/probe", headers={"X-Tenant-ID": "nosuchtenant"})
        assert response.status_code == 200
        assert response.json()["ref"] == "None"

    serve_serially: ClassVar[Callable[[Any], LiveServer]]
