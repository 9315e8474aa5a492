"""The workspace API for real: the app served by uvicorn over a SQLite store, with tokens of
the stack's dev issuer; the tests call it over HTTP as several users and read the store and the
authorizer's tuples directly. Every test runs twice: with the default authorizer, which decides
over the store's relationships, and with OpenFGA (the real openfga-sdk against
``tests/openfga_double.py``), where the routes must keep the server's tuples in step with the
store themselves. The lifespan connects a Temporal client, so the stack starts a dev server too
(no worker: no route here starts a workflow). Each test works in workspaces of its own; each
authorizer's stack is shared by the module."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from qmachina.authz.evaluator import RelationTuple
from qmachina.authz.relationships import store_relationships, user_object, workspace_object
from qmachina.store import repository as repo
from qmachina.store.models import AuditEvent, Workspace
from tests.live_server import ServedApi
from tests.openfga_double import OpenFgaDouble

WORKSPACES = "/v1/workspaces"
UNLIMITED = {"limit": None, "current": 0}


class WorkspaceApi(ServedApi):
    """The served API over its own store, deciding through ``openfga`` when given."""

    def __init__(self, data_dir: Path, openfga: OpenFgaDouble | None = None) -> None:
        super().__init__("workspace-api", data_dir, openfga)

    def as_user(self, subject: str, timeout: float = 30.0) -> httpx.Client:
        return super().as_user(subject, timeout)

    def member_tuples(self, slug: str) -> set[tuple[str, str]]:
        """``(user, role)`` of every role tuple the authorizer decides over on the workspace:
        the OpenFGA server's, else those the store implies."""
        target = workspace_object(self.workspace(slug).id)
        if self.openfga is not None:
            held = self.openfga.tuples(self.openfga_ids.store_id)
        else:

            async def implied() -> list[RelationTuple]:
                async with self.sessions() as session:
                    return await store_relationships(session)

            held = self.run(implied())
        return {(t.user, t.relation) for t in held if t.object == target}

    def workspace(self, slug: str) -> Workspace:
        async def find() -> Workspace:
            async with self.sessions() as session:
                found = await repo.workspace_by_slug(session, slug)
            assert found is not None, slug
            return found

        return self.run(find())

    def audit(self, slug: str) -> list[tuple[str, str, str, dict[str, Any]]]:
        """The workspace's audit rows as stored, oldest first: (actor, action, target,
        payload)."""

        workspace_id = self.workspace(slug).id

        async def trail() -> list[AuditEvent]:
            async with self.sessions() as session:
                return await repo.audit_trail(session, workspace_id)

        return [(e.actor, e.action, e.target, e.payload) for e in self.run(trail())]

    def add_job(self, slug: str, artifact_bytes: int) -> None:
        """A queued job of the workspace referencing one lake file of ``artifact_bytes``."""
        workspace_id = self.workspace(slug).id

        async def add() -> None:
            async with self.sessions.begin() as session:
                job = await repo.create_job(session, workspace_id, "usage", "f" * 64)
                await repo.add_artifact(
                    session,
                    workspace_id,
                    job.id,
                    "silver",
                    f"lake://{job.id}/silver.parquet",
                    "0" * 64,
                    artifact_bytes,
                )

        self.run(add())


@pytest.fixture(scope="module", params=["store", "openfga"])
def api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkspaceApi]:
    with ExitStack() as stack:
        openfga = stack.enter_context(OpenFgaDouble()) if request.param == "openfga" else None
        live = WorkspaceApi(tmp_path_factory.mktemp(f"workspaces-{request.param}"), openfga)
        stack.callback(live.close)
        live.run(live.start())
        yield live


def create(api: WorkspaceApi, owner: str, slug: str) -> None:
    with api.as_user(owner) as http:
        response = http.post(WORKSPACES, json={"slug": slug, "name": slug.title()})
    assert response.status_code == 201, response.text


def set_role(api: WorkspaceApi, caller: str, slug: str, subject: str, role: str) -> httpx.Response:
    with api.as_user(caller) as http:
        return http.put(f"{WORKSPACES}/{slug}/members/{subject}", json={"role": role})


def remove(api: WorkspaceApi, caller: str, slug: str, subject: str) -> httpx.Response:
    with api.as_user(caller) as http:
        return http.delete(f"{WORKSPACES}/{slug}/members/{subject}")


def test_creating_a_workspace_makes_the_caller_its_owner(api: WorkspaceApi) -> None:
    with api.as_user("olive") as olive:
        created = olive.post(WORKSPACES, json={"slug": "desk-1", "name": "Rates desk"})
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["slug"], body["name"], body["role"]) == ("desk-1", "Rates desk", "owner")
        assert created.headers["location"] == f"{WORKSPACES}/desk-1"

        detail = olive.get(f"{WORKSPACES}/desk-1").json()
        assert (detail["id"], detail["role"]) == (body["id"], "owner")
        assert detail["quotas"] == {
            "max_concurrent_jobs": UNLIMITED,
            "max_streams": UNLIMITED,
            "max_storage_bytes": UNLIMITED,
            "max_concurrent_chunks": None,
        }
        unnamed = olive.post(WORKSPACES, json={"slug": "desk-2"})
        assert unnamed.json()["name"] == "desk-2"

    assert api.member_tuples("desk-1") == {(user_object("olive"), "owner")}
    assert api.audit("desk-1") == [
        (
            "olive",
            "workspace.create",
            f"workspace:{body['id']}",
            {"slug": "desk-1", "name": "Rates desk"},
        )
    ]

    with api.as_user("mallory") as mallory:
        hidden = mallory.get(f"{WORKSPACES}/desk-1")
        missing = mallory.get(f"{WORKSPACES}/no-such-desk")
        taken = mallory.post(WORKSPACES, json={"slug": "desk-1", "name": "Mine"})
        bad_slug = mallory.post(WORKSPACES, json={"slug": "Desk_1"})
        extra = mallory.post(WORKSPACES, json={"slug": "desk-3", "owner": "mallory"})
    # Another user's workspace is indistinguishable from none at all.
    assert (hidden.status_code, missing.status_code) == (404, 404)
    assert hidden.json()["detail"] == "workspace 'desk-1' not found"
    assert taken.status_code == 409
    assert taken.json()["detail"] == "workspace 'desk-1' already exists"
    assert bad_slug.status_code == 422
    assert [issue["field"] for issue in bad_slug.json()["issues"]] == ["slug"]
    assert extra.status_code == 422
    assert api.workspace("desk-1").name == "Rates desk"


def test_listing_shows_the_readable_workspaces_with_the_callers_role(api: WorkspaceApi) -> None:
    create(api, "lena", "list-own")
    create(api, "otis", "list-shared")
    create(api, "otis", "list-private")
    assert set_role(api, "otis", "list-shared", "lena", "viewer").status_code == 200

    with api.as_user("lena") as lena:
        listed = lena.get(WORKSPACES)
    assert listed.status_code == 200
    seen = [(w["slug"], w["role"]) for w in listed.json()["workspaces"]]
    assert seen == [("list-own", "owner"), ("list-shared", "viewer")]
    with api.as_user("nobody-at-all") as nobody:
        assert nobody.get(WORKSPACES).json() == {"workspaces": []}


def test_members_are_added_changed_and_removed_in_step_with_the_authorizer(
    api: WorkspaceApi,
) -> None:
    create(api, "ada", "team")
    added = set_role(api, "ada", "team", "vic", "viewer")
    assert added.status_code == 200, added.text
    assert (added.json()["role"], added.json()["previous"]) == ("viewer", None)

    with api.as_user("vic") as vic:
        assert vic.get(f"{WORKSPACES}/team").json()["role"] == "viewer"
        members = vic.get(f"{WORKSPACES}/team/members").json()["members"]
        assert [(m["subject"], m["role"]) for m in members] == [
            ("ada", "owner"),
            ("vic", "viewer"),
        ]
        refused = vic.patch(f"{WORKSPACES}/team/quotas", json={"max_streams": 1})
        assert refused.status_code == 403
        assert "lacks can_manage_quotas" in refused.json()["detail"]
        assert set_role(api, "vic", "team", "vic", "admin").status_code == 403

    changed = set_role(api, "ada", "team", "vic", "editor")
    assert (changed.json()["role"], changed.json()["previous"]) == ("editor", "viewer")
    # The old role's tuple is gone: nothing lingers that the store no longer records.
    assert api.member_tuples("team") == {
        (user_object("ada"), "owner"),
        (user_object("vic"), "editor"),
    }
    unchanged = set_role(api, "ada", "team", "vic", "editor")
    assert unchanged.json()["previous"] == "editor"
    assert set_role(api, "ada", "team", "vic", "superuser").status_code == 422

    # Subjects of some issuers hold `:` and `/`; they travel escaped and come back whole.
    pipeline = "repo:octo/app:ref:refs/heads/main"
    escaped = pipeline.replace(":", "%3A").replace("/", "%2F")
    assert set_role(api, "ada", "team", escaped, "viewer").json()["subject"] == pipeline
    with api.as_user(pipeline) as robot:
        assert robot.get(f"{WORKSPACES}/team").json()["role"] == "viewer"

    with api.as_user("ada") as ada:
        assert ada.delete(f"{WORKSPACES}/team/members/vic").status_code == 204
        again = ada.delete(f"{WORKSPACES}/team/members/vic")
        assert ada.delete(f"{WORKSPACES}/team/members/{escaped}").status_code == 204
    assert again.status_code == 404
    assert "'vic' is not a member" in again.json()["detail"]
    assert api.member_tuples("team") == {(user_object("ada"), "owner")}
    with api.as_user("vic") as vic:
        assert vic.get(f"{WORKSPACES}/team").status_code == 404

    assert [row[1:] for row in api.audit("team")][1:] == [
        ("workspace.member_set", "user:vic", {"role": "viewer", "previous": None}),
        ("workspace.member_set", "user:vic", {"role": "editor", "previous": "viewer"}),
        ("workspace.member_set", f"user:{pipeline}", {"role": "viewer", "previous": None}),
        ("workspace.member_remove", "user:vic", {"role": "editor"}),
        ("workspace.member_remove", f"user:{pipeline}", {"role": "viewer"}),
    ]
    assert {row[0] for row in api.audit("team")} == {"ada"}


def test_only_owners_grant_or_take_the_owner_role_and_one_always_remains(
    api: WorkspaceApi,
) -> None:
    create(api, "oona", "gov")
    assert set_role(api, "oona", "gov", "adam", "admin").status_code == 200
    assert set_role(api, "oona", "gov", "eddie", "editor").status_code == 200

    for refused in (
        set_role(api, "adam", "gov", "eve", "owner"),
        set_role(api, "adam", "gov", "oona", "admin"),
        remove(api, "adam", "gov", "oona"),
    ):
        assert refused.status_code == 403, refused.text
        assert "lacks can_manage_owners" in refused.json()["detail"]
    # An admin manages every other role; an editor manages none.
    assert set_role(api, "adam", "gov", "eve", "viewer").status_code == 200
    assert set_role(api, "eddie", "gov", "eve", "editor").status_code == 403

    last = set_role(api, "oona", "gov", "oona", "admin")
    assert last.status_code == 409
    assert "last owner" in last.json()["detail"]
    assert remove(api, "oona", "gov", "oona").status_code == 409

    assert set_role(api, "oona", "gov", "otto", "owner").status_code == 200
    assert set_role(api, "otto", "gov", "oona", "admin").status_code == 200
    assert set_role(api, "otto", "gov", "otto", "viewer").status_code == 409
    assert api.member_tuples("gov") == {
        (user_object("otto"), "owner"),
        (user_object("oona"), "admin"),
        (user_object("adam"), "admin"),
        (user_object("eddie"), "editor"),
        (user_object("eve"), "viewer"),
    }
    # The refusals changed nothing, so they left no audit row.
    assert [(actor, payload) for actor, action, _, payload in api.audit("gov")[1:]] == [
        ("oona", {"role": "admin", "previous": None}),
        ("oona", {"role": "editor", "previous": None}),
        ("adam", {"role": "viewer", "previous": None}),
        ("oona", {"role": "owner", "previous": None}),
        ("otto", {"role": "admin", "previous": "owner"}),
    ]


def test_quota_patches_change_only_the_named_quotas(api: WorkspaceApi) -> None:
    create(api, "quinn", "quota")
    path = f"{WORKSPACES}/quota/quotas"

    def limits(body: dict[str, Any]) -> tuple[int | None, ...]:
        return (
            body["max_concurrent_jobs"]["limit"],
            body["max_streams"]["limit"],
            body["max_storage_bytes"]["limit"],
            body["max_concurrent_chunks"],
        )

    with api.as_user("quinn") as quinn:
        assert limits(quinn.patch(path, json={"max_concurrent_jobs": 2}).json()) == (
            2,
            None,
            None,
            None,
        )
        both = {"max_storage_bytes": 10**10, "max_concurrent_chunks": 3}
        assert limits(quinn.patch(path, json=both).json()) == (2, None, 10**10, 3)
        cleared = quinn.patch(path, json={"max_concurrent_jobs": None, "max_streams": 0})
        assert limits(cleared.json()) == (None, 0, 10**10, 3)
        assert limits(quinn.patch(path, json={}).json()) == (None, 0, 10**10, 3)

        for invalid, field in (
            ({"max_streams": -1}, "max_streams"),
            ({"max_storage_bytes": -5}, "max_storage_bytes"),
            ({"max_concurrent_chunks": 0}, "max_concurrent_chunks"),
            ({"max_storage_bytes": False}, "max_storage_bytes"),
            ({"max_concurrent_jobs": "4"}, "max_concurrent_jobs"),
            ({"max_jobs": 1}, "max_jobs"),
            # Beyond what the store's columns hold (found by the fuzz test as a 500).
            ({"max_streams": 2**31}, "max_streams"),
            ({"max_storage_bytes": 2**63}, "max_storage_bytes"),
            ({"max_storage_bytes": 2**53 + 1}, "max_storage_bytes"),
        ):
            refused = quinn.patch(path, json=invalid)
            assert refused.status_code == 422, invalid
            assert [issue["field"] for issue in refused.json()["issues"]] == [field]
        assert limits(quinn.get(path).json()) == (None, 0, 10**10, 3)

        api.add_job("quota", artifact_bytes=4096)
        use = quinn.get(f"{WORKSPACES}/quota").json()["quotas"]
    assert use["max_concurrent_jobs"] == {"limit": None, "current": 1}
    assert use["max_storage_bytes"] == {"limit": 10**10, "current": 4096}
    assert use["max_streams"] == {"limit": 0, "current": 0}

    quota_rows = [row for row in api.audit("quota") if row[1] == "workspace.quotas"]
    assert [payload for *_, payload in quota_rows] == [
        {"max_concurrent_jobs": {"from": None, "to": 2}},
        {
            "max_storage_bytes": {"from": None, "to": 10**10},
            "max_concurrent_chunks": {"from": None, "to": 3},
        },
        {
            "max_concurrent_jobs": {"from": 2, "to": None},
            "max_streams": {"from": None, "to": 0},
        },
    ]
    ws = api.workspace("quota")
    assert (ws.max_concurrent_jobs, ws.max_streams, ws.max_storage_bytes) == (None, 0, 10**10)


def test_the_audit_trail_is_for_admins_newest_first_and_filtered(api: WorkspaceApi) -> None:
    create(api, "aria", "trail")
    for subject, role in (("tv", "viewer"), ("te", "editor"), ("ta", "admin")):
        assert set_role(api, "aria", "trail", subject, role).status_code == 200
    with api.as_user("aria") as aria:
        aria.patch(f"{WORKSPACES}/trail/quotas", json={"max_streams": 2})
    path = f"{WORKSPACES}/trail/audit"

    for subject, status in (("tv", 403), ("te", 403), ("stranger", 404)):
        with api.as_user(subject) as caller:
            assert caller.get(path).status_code == status, subject

    with api.as_user("ta") as admin:
        full = admin.get(path).json()
        assert full["total"] == 5
        assert [e["action"] for e in full["events"]] == [
            "workspace.quotas",
            "workspace.member_set",
            "workspace.member_set",
            "workspace.member_set",
            "workspace.create",
        ]
        assert full["events"][0]["payload"] == {"max_streams": {"from": None, "to": 2}}
        assert full["events"][1]["target"] == "user:ta"

        sets = admin.get(path, params={"action": "workspace.member_set"}).json()
        assert (sets["total"], len(sets["events"])) == (3, 3)
        assert admin.get(path, params={"actor": "ta"}).json()["total"] == 0
        admin.patch(f"{WORKSPACES}/trail/quotas", json={"max_streams": 3})
        mine = admin.get(path, params={"actor": "ta", "action": "workspace.quotas"}).json()
        assert [e["payload"] for e in mine["events"]] == [{"max_streams": {"from": 2, "to": 3}}]

        page = admin.get(path, params={"limit": 2, "offset": 2}).json()
        assert (page["total"], page["limit"], page["offset"]) == (6, 2, 2)
        assert [e["id"] for e in page["events"]] == [e["id"] for e in full["events"][1:3]]
        for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
            assert admin.get(path, params=bad).status_code == 422, bad


def test_every_workspace_route_needs_a_token(api: WorkspaceApi) -> None:
    with httpx.Client(base_url=api.base_url) as anonymous:
        for method, path in (
            ("POST", WORKSPACES),
            ("GET", WORKSPACES),
            ("GET", f"{WORKSPACES}/default"),
            ("PUT", f"{WORKSPACES}/default/members/x"),
            ("PATCH", f"{WORKSPACES}/default/quotas"),
            ("GET", f"{WORKSPACES}/default/audit"),
        ):
            assert anonymous.request(method, path).status_code == 401, (method, path)


def test_concurrent_creations_of_one_slug_make_one_workspace(api: WorkspaceApi) -> None:
    def attempt(subject: str) -> int:
        with api.as_user(subject) as http:
            return http.post(WORKSPACES, json={"slug": "contested"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(attempt, [f"racer-{n}" for n in range(8)]))
    assert codes == [201] + [409] * 7
