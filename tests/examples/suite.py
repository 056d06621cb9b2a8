"""What both example apps must do, written once; each app's test module subclasses
:class:`ExampleAppSuite` with its own factory and server.

Every test drives a real server over HTTP; where rows landed is checked with the admin role in the
database each tenant's placement uses (acme: its own database; globex and default: the main one).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from examples.common import DEMO_TENANTS, Settings, first_user
from examples.launch import curl_examples
from tests.live_server import LiveServer

from .conftest import DemoWorld, unique

SLUGS = ("acme", "globex", "default")
SEEDED = {t.slug: list(t.projects) for t in DEMO_TENANTS}
#: Where each tenant's tenant-table rows must be: (database, tenant)
HOME = {"acme": ("acme", "acme"), "globex": ("main", "globex"), "default": ("main", "default")}


class ExampleAppSuite:
    """Subclasses set ``create_app(settings) -> app`` and ``serve(app) -> LiveServer``;
    ``dispose(app)`` releases what the server's shutdown does not."""

    @staticmethod
    def create_app(settings: Settings) -> Any:
        raise NotImplementedError

    @staticmethod
    def serve(app: Any) -> LiveServer:
        raise NotImplementedError

    @staticmethod
    def dispose(app: Any) -> None:
        """Nothing by default: an ASGI app's lifespan releases its resources."""

    @classmethod
    def _client(cls, settings: Settings) -> Iterator[httpx.Client]:
        app = cls.create_app(settings)
        server = cls.serve(app)
        try:
            with server.client() as client:
                yield client
        finally:
            server.stop()
            cls.dispose(app)

    @pytest.fixture(scope="class")
    @classmethod
    def client(cls, world: DemoWorld) -> Iterator[httpx.Client]:
        yield from cls._client(world.settings)

    @pytest.fixture(scope="class")
    @classmethod
    def no_dev_client(cls, world: DemoWorld) -> Iterator[httpx.Client]:
        yield from cls._client(dataclasses.replace(world.settings, dev_tokens=False))

    # -- isolation across placements ------------------------------------------------------------

    def test_each_tenant_lists_exactly_its_own_projects(self, client: httpx.Client, world: DemoWorld) -> None:
        seen = {}
        for slug in SLUGS:
            response = client.get("/projects", headers=world.bearer(slug))
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["tenant"] == slug
            seen[slug] = [p["name"] for p in body["projects"]]
            assert seen[slug] == world.names(slug)  # what PostgreSQL holds for it, in order
            assert set(SEEDED[slug]) <= set(seen[slug])
        assert not set(seen["acme"]) & (set(seen["globex"]) | set(seen["default"]))
        assert not set(seen["globex"]) & set(seen["default"])

    def test_created_projects_and_tasks_land_in_the_tenants_placement(
        self, client: httpx.Client, world: DemoWorld
    ) -> None:
        for slug in ("acme", "globex"):
            name, title = unique(f"{slug}-project"), unique(f"{slug}-task")
            created = client.post("/projects", json={"name": name}, headers=world.bearer(slug))
            assert created.status_code == 201, created.text
            project_id = created.json()["project"]["id"]
            task = client.post(
                f"/projects/{project_id}/tasks",
                json={"title": title},
                headers=world.bearer(slug, "writer@example.test"),
            )
            assert task.status_code == 201, task.text
            assert task.json()["task"]["created_by"] == "writer@example.test"
            assert world.where("projects", "name", name) == {HOME[slug]}
            assert world.where("tasks", "title", title) == {HOME[slug]}
            listed = client.get(f"/projects/{project_id}/tasks", headers=world.bearer(slug)).json()
            assert [t["title"] for t in listed["tasks"]] == [title]
            for other in SLUGS:
                if other != slug:
                    projects = client.get("/projects", headers=world.bearer(other)).json()["projects"]
                    assert name not in [p["name"] for p in projects]

    def test_a_project_of_another_tenant_is_not_found(self, client: httpx.Client, world: DemoWorld) -> None:
        # globex and default share the main database's tables (one id sequence): ids never collide
        globex_project = world.data.first_project["globex"]
        title = unique("intruder")
        as_default = world.bearer("default")
        listed = client.get(f"/projects/{globex_project}/tasks", headers=as_default)
        assert (listed.status_code, listed.json()["error"]) == (404, "not_found")
        posted = client.post(f"/projects/{globex_project}/tasks", json={"title": title}, headers=as_default)
        assert posted.status_code == 404
        assert world.where("tasks", "title", title) == set()

    def test_me_names_the_tenant_the_subject_and_the_user_from_auth_users(
        self, client: httpx.Client, world: DemoWorld
    ) -> None:
        for slug in SLUGS:
            email = first_user(slug)
            body = client.get("/me", headers=world.bearer(slug, email)).json()
            assert (body["tenant"], body["subject"], body["anonymous"]) == (slug, email, False)
            assert body["placement"] == world.data.tenants[slug].strategy
            assert body["user"]["email"] == email  # acme reads auth.users through postgres_fdw
        # auth.users is one table for everybody, but a tenant sees only its own users in it
        foreign = client.get("/me", headers=world.bearer("acme", first_user("globex"))).json()
        assert (foreign["tenant"], foreign["user"]) == ("acme", None)
        foreign = client.get("/me", headers=world.bearer("globex", first_user("acme"))).json()
        assert (foreign["tenant"], foreign["user"]) == ("globex", None)

    def test_concurrent_requests_for_different_tenants_never_mix(
        self, client: httpx.Client, world: DemoWorld
    ) -> None:
        expected = {slug: world.names(slug) for slug in SLUGS}
        tokens = {slug: world.bearer(slug) for slug in SLUGS}
        batch = unique("concurrent")

        def call(i: int) -> tuple[str, str | None, httpx.Response]:
            slug = SLUGS[i % len(SLUGS)]
            if i % 2:
                return slug, None, client.get("/projects", headers=tokens[slug])
            title = f"{batch}-{slug}-{i}"
            project = world.data.first_project[slug]
            return (
                slug,
                title,
                client.post(f"/projects/{project}/tasks", json={"title": title}, headers=tokens[slug]),
            )

        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(call, range(40)))
        for slug, title, response in results:
            if title is None:
                assert response.status_code == 200, response.text
                assert response.json()["tenant"] == slug
                assert [p["name"] for p in response.json()["projects"]] == expected[slug]
            else:
                assert response.status_code == 201, response.text
                assert response.json()["tenant"] == slug
                assert world.where("tasks", "title", title) == {HOME[slug]}

    # -- the checkpoint ---------------------------------------------------------------------------

    def test_a_token_for_another_tenant_is_refused_with_403(
        self, client: httpx.Client, world: DemoWorld
    ) -> None:
        name = unique("smuggled")
        wrong = {"X-Tenant-ID": "acme", **world.bearer("globex")}
        for response in (
            client.get("/projects", headers=wrong),
            client.get("/me", headers=wrong),
            client.post("/projects", json={"name": name}, headers=wrong),
        ):
            assert response.status_code == 403
            assert response.json()["error"] == "tenant_mismatch"
            assert "Rocket skates" not in response.text
        assert world.where("projects", "name", name) == set()

    def test_requests_without_credentials_get_401(self, client: httpx.Client, world: DemoWorld) -> None:
        name = unique("anonymous")
        for response in (
            client.get("/projects"),
            client.get("/projects", headers={"X-Tenant-ID": "acme"}),
            client.get("/me", headers={"X-Tenant-ID": "globex"}),
            client.post("/projects", json={"name": name}, headers={"X-Tenant-ID": "acme"}),
        ):
            assert response.status_code == 401
            assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert world.where("projects", "name", name) == set()

    def test_a_token_signed_with_another_key_gets_401(self, client: httpx.Client, world: DemoWorld) -> None:
        forged = world.token("acme", secret="not-the-example-secret-0123456789abcdefgh")
        response = client.get("/projects", headers={"Authorization": f"Bearer {forged}"})
        assert (response.status_code, response.json()["error"]) == (401, "invalid_token")

    def test_the_access_key_admits_anonymous_readers_only(
        self, client: httpx.Client, world: DemoWorld
    ) -> None:
        keyed = {"X-Tenant-ID": "acme", "X-Tenant-Access-Key": world.data.access_keys["acme"]}
        listed = client.get("/projects", headers=keyed)
        assert listed.status_code == 200
        assert [p["name"] for p in listed.json()["projects"]] == world.names("acme")
        me = client.get("/me", headers=keyed).json()
        assert (me["tenant"], me["anonymous"], me["subject"], me["user"]) == ("acme", True, None, None)
        # tasks are private: PostgreSQL refuses them to the anonymous role (acme: in its own database)
        tasks = client.get(f"/projects/{world.data.first_project['acme']}/tasks", headers=keyed)
        assert (tasks.status_code, tasks.json()["error"]) == (403, "private")
        name = unique("anonymous-write")
        refused = client.post("/projects", json={"name": name}, headers=keyed)
        assert (refused.status_code, refused.json()["error"]) == (403, "read_only")
        assert world.where("projects", "name", name) == set()
        # acme's key opens acme only
        other = client.get("/projects", headers={**keyed, "X-Tenant-ID": "globex"})
        assert other.status_code == 401

    # -- the rest of the API ----------------------------------------------------------------------

    @pytest.mark.parametrize(
        "body",
        [{}, {"name": ""}, {"name": "   "}, {"name": 7}, {"name": "x" * 201}, ["a list"]],
        ids=["missing", "empty", "blank", "number", "too-long", "not-an-object"],
    )
    def test_invalid_input_is_400(self, client: httpx.Client, world: DemoWorld, body: Any) -> None:
        response = client.post("/projects", json=body, headers=world.bearer("globex"))
        assert (response.status_code, response.json()["error"]) == (400, "invalid_input")

    def test_the_health_check_needs_no_tenant(self, client: httpx.Client) -> None:
        assert client.get("/health").json() == {"status": "ok"}

    def test_dev_tokens_work_and_exist_only_when_enabled(
        self, client: httpx.Client, no_dev_client: httpx.Client, world: DemoWorld
    ) -> None:
        minted = client.post("/dev/token", json={"tenant": "globex", "sub": "hank@globex.test"})
        assert minted.status_code == 200
        assert "Demo only" in minted.json()["warning"]
        me = client.get("/me", headers={"Authorization": f"Bearer {minted.json()['token']}"}).json()
        assert (me["tenant"], me["subject"], me["user"]["name"]) == (
            "globex",
            "hank@globex.test",
            "Hank Scorpio",
        )
        # without dev_tokens there is no such route (an unknown path may be refused before routing)
        payload = {"tenant": "acme", "sub": "x"}
        anonymous = no_dev_client.post("/dev/token", json=payload)
        assert anonymous.status_code in (401, 404) and "eyJ" not in anonymous.text
        authenticated = no_dev_client.post("/dev/token", json=payload, headers=world.bearer("globex"))
        assert authenticated.status_code == 404 and "eyJ" not in authenticated.text

    def test_every_error_is_json(self, client: httpx.Client, world: DemoWorld) -> None:
        """Also the answers the framework gives itself: unknown path, wrong method."""
        for method, path, headers in (
            ("GET", "/no/such/path", world.bearer("globex")),
            ("GET", "/no/such/path", {}),
            ("DELETE", "/health", {}),
            ("DELETE", "/projects", world.bearer("globex")),
        ):
            response = client.request(method, path, headers=headers)
            assert response.status_code in (401, 404, 405), (method, path, response.status_code)
            assert response.headers["content-type"].startswith("application/json"), (method, path)
            assert response.json(), (method, path)

    def test_every_advertised_curl_example_does_what_it_says(
        self, client: httpx.Client, world: DemoWorld
    ) -> None:
        tokens = {slug: world.token(slug, first_user(slug)) for slug in ("acme", "globex")}
        for example in curl_examples(tokens, world.data.access_keys, world.data.first_project):
            response = client.request(
                example.method, example.path, headers=dict(example.headers), json=example.json
            )
            assert response.status_code == example.expect, (example.description, response.text)


def assert_shutdown_releases_everything(
    world: DemoWorld,
    caplog: pytest.LogCaptureFixture,
    create_app: Callable[[Settings], Any],
    serve: Callable[[Any], LiveServer],
    dispose: Callable[[Any], None] = lambda app: None,
) -> None:
    """Serve every tenant once (acme through its own engine), stop the server: no connection of
    the app's roles stays open, and closing them logged no error. Run with no other app alive."""
    app = create_app(world.settings)
    server = serve(app)
    try:
        with server.client() as client:
            for slug in SLUGS:
                assert client.get("/me", headers=world.bearer(slug)).status_code == 200
    finally:
        server.stop()
        dispose(app)
    acme = world.data.tenants["acme"].location
    roles = [world.settings.database_url.username, acme["role"], acme["fdw_role"]]
    deadline = time.monotonic() + 5
    while True:
        with world.admin.connect() as conn:
            left = conn.execute(
                text("select usename, datname from pg_stat_activity where usename = any(:roles)"),
                {"roles": roles},
            ).all()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
