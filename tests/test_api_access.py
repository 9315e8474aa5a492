"""Authorization of every route, for real: the API served by uvicorn on a Temporal dev server and
a SQLite store holding two workspaces, their members and a job of each, one shared.

- Every route declares exactly one :class:`api.access.Permission`.
- The cross-tenant matrix calls every route as each role of the owning workspace, as the owner
  of another workspace, as a member of the workspace the job is shared with, and as a stranger,
  and expects the route's own answer (allowed), 403 (a member lacking the relation) or 404 (the
  caller cannot see the object), with the store unchanged by every refusal.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import RouteContext, iter_route_contexts

from api.access import Permission
from api.app import create_app
from qmachina.auth import mint_token
from qmachina.settings import load_settings
from qmachina.store import governance
from qmachina.store import repository as repo
from tests.access_stack import SERVING_ALIAS, SERVING_SPEC, AccessStack, World

PUBLIC_PATHS = {
    "/v1/health",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/.well-known/jwks.json",
    "/.well-known/openid-configuration",
}
ROLES = ("owner", "admin", "editor", "viewer")
RANK = {role: len(ROLES) - index for index, role in enumerate(ROLES)}


def permissions_of(dependant: Dependant) -> list[Permission]:
    """Every Permission in a route's dependency tree."""
    found = [dependant.call] if isinstance(dependant.call, Permission) else []
    for child in dependant.dependencies:
        found += permissions_of(child)
    return found


def api_routes() -> list[RouteContext]:
    """The app's HTTP routes as served (with the dependencies of the routers they are in)."""
    app = create_app(load_settings(data_dir=Path("/nonexistent-qmachina-data")))
    return [route for route in iter_route_contexts(app.routes) if route.methods is not None]


def test_every_route_declares_exactly_one_permission() -> None:
    declared: dict[str, str] = {}
    for route in api_routes():
        if route.path in PUBLIC_PATHS:
            dependant = getattr(route, "dependant", None)  # Starlette's own routes have none
            assert dependant is None or permissions_of(dependant) == [], route.path
            continue
        permissions = permissions_of(route.dependant)
        assert len(permissions) == 1, f"{route.path} declares {permissions}"
        for method in route.methods or ():
            declared[f"{method} {route.path}"] = repr(permissions[0])
    assert len(declared) >= 18, declared
    assert declared["POST /v1/jobs/experiments"] == "InWorkspace('can_mutate' on workspace)"
    assert declared["GET /v1/workspaces/{workspace}/audit"] == (
        "OnWorkspace('can_read_audit' on workspace)"
    )
    assert declared["PUT /v1/serving/aliases/{alias}"] == "InWorkspace('can_mutate' on workspace)"
    assert declared["GET /v1/serving/diff"] == "InWorkspace('can_read' on workspace)"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccessStack]:
    live = AccessStack(tmp_path_factory.mktemp("access"))
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


@dataclass(frozen=True)
class Case:
    """One route called one way: the least role of the owning workspace it needs, what an
    allowed caller gets, and whether a reader of the job's sharing workspace is allowed."""

    method: str
    route: str
    path: str
    least_role: str
    allowed_status: int
    json: dict[str, Any] | None = None
    via_share: str = "denied"
    """For job routes: "allowed" or "denied" (403) for a member of the workspace the job is
    shared with, acting there; "n/a" for workspace routes."""
    query: tuple[tuple[str, str], ...] = ()
    """Query parameters besides ``workspace``."""


def cases(world: World) -> list[Case]:
    job = f"/v1/jobs/experiments/{world.shared_job}"
    ws = "/v1/workspaces/acme"
    serving = "/v1/serving"
    version = world.version_id
    return [
        Case("GET", "/v1/jobs/experiments", "/v1/jobs/experiments", "viewer", 200, via_share="n/a"),
        # An editor's submission reaches validation: an empty body is a 422, nothing started.
        Case("POST", "/v1/jobs/experiments", "/v1/jobs/experiments", "editor", 422, {}, "n/a"),
        Case("GET", "/v1/experiments", "/v1/experiments", "viewer", 200, via_share="n/a"),
        Case("GET", "/v1/jobs/experiments/{job_id}", job, "viewer", 200, via_share="allowed"),
        # The job has ended: an allowed cancel is a 409.
        Case("POST", "/v1/jobs/experiments/{job_id}/cancel", f"{job}/cancel", "editor", 409),
        Case(
            "GET",
            "/v1/jobs/experiments/{job_id}/events",
            f"{job}/events",
            "viewer",
            200,
            via_share="allowed",
        ),
        Case(
            "GET",
            "/v1/jobs/experiments/{job_id}/runs",
            f"{job}/runs",
            "viewer",
            200,
            via_share="allowed",
        ),
        Case(
            "GET",
            "/v1/jobs/experiments/{job_id}/runs/{point_hash}",
            f"{job}/runs/{world.point_hash}",
            "viewer",
            200,
            via_share="allowed",
        ),
        # Sharing with the workspace it is already shared with changes nothing.
        Case(
            "PUT",
            "/v1/jobs/experiments/{job_id}/shares/{target}",
            f"{job}/shares/globex",
            "admin",
            204,
        ),
        # Withdrawing from a workspace it was never shared with changes nothing.
        Case(
            "DELETE",
            "/v1/jobs/experiments/{job_id}/shares/{target}",
            f"{job}/shares/default",
            "admin",
            204,
        ),
        Case("GET", "/v1/workspaces/{workspace}", ws, "viewer", 200, via_share="n/a"),
        Case(
            "GET",
            "/v1/workspaces/{workspace}/members",
            f"{ws}/members",
            "viewer",
            200,
            via_share="n/a",
        ),
        # An invalid role reaches validation.
        Case(
            "PUT",
            "/v1/workspaces/{workspace}/members/{subject:path}",
            f"{ws}/members/zed",
            "admin",
            422,
            {"role": "emperor"},
            "n/a",
        ),
        # Removing someone who is not a member: the allowed answer names the member.
        Case(
            "DELETE",
            "/v1/workspaces/{workspace}/members/{subject:path}",
            f"{ws}/members/zed",
            "admin",
            404,
            via_share="n/a",
        ),
        Case(
            "GET",
            "/v1/workspaces/{workspace}/quotas",
            f"{ws}/quotas",
            "viewer",
            200,
            via_share="n/a",
        ),
        Case(
            "PATCH",
            "/v1/workspaces/{workspace}/quotas",
            f"{ws}/quotas",
            "admin",
            422,
            {"max_streams": -1},
            "n/a",
        ),
        Case(
            "GET", "/v1/workspaces/{workspace}/audit", f"{ws}/audit", "admin", 200, via_share="n/a"
        ),
        Case("GET", f"{serving}/versions", f"{serving}/versions", "viewer", 200, via_share="n/a"),
        # The version is registered already: an allowed registration finds it (200, no change).
        Case(
            "POST",
            f"{serving}/versions",
            f"{serving}/versions",
            "editor",
            200,
            {"spec": SERVING_SPEC},
            "n/a",
        ),
        Case(
            "GET",
            f"{serving}/versions/{{version_id}}",
            f"{serving}/versions/{version}",
            "viewer",
            200,
            via_share="n/a",
        ),
        Case("GET", f"{serving}/aliases", f"{serving}/aliases", "viewer", 200, via_share="n/a"),
        Case(
            "GET",
            f"{serving}/aliases/{{alias}}",
            f"{serving}/aliases/{SERVING_ALIAS}",
            "viewer",
            200,
            via_share="n/a",
        ),
        # Repointing the alias at the version it names: allowed, and nothing changes.
        Case(
            "PUT",
            f"{serving}/aliases/{{alias}}",
            f"{serving}/aliases/{SERVING_ALIAS}",
            "editor",
            200,
            {"version_id": version, "reason": "keep it"},
            "n/a",
        ),
        # The alias has one activation: an allowed rollback has nowhere to go (409).
        Case(
            "POST",
            f"{serving}/aliases/{{alias}}/rollback",
            f"{serving}/aliases/{SERVING_ALIAS}/rollback",
            "editor",
            409,
            {"reason": "undo"},
            "n/a",
        ),
        Case(
            "GET",
            f"{serving}/diff",
            f"{serving}/diff",
            "viewer",
            200,
            via_share="n/a",
            query=(("a", SERVING_ALIAS), ("b", version[:8])),
        ),
        # No version has this id: an allowed promotion is refused before any workflow starts.
        Case(
            "POST",
            f"{serving}/promotions",
            f"{serving}/promotions",
            "editor",
            404,
            {"version": "f" * 8, "alias": "es-next", "reason": "try"},
            "n/a",
        ),
        # The alias was never promoted: an allowed reader is told so.
        Case(
            "GET",
            f"{serving}/promotions/{{alias}}",
            f"{serving}/promotions/es-next",
            "viewer",
            404,
            via_share="n/a",
        ),
        # Nothing awaits a decision: an allowed editor's decision is a conflict.
        Case(
            "POST",
            f"{serving}/promotions/{{alias}}/decision",
            f"{serving}/promotions/es-next/decision",
            "editor",
            409,
            {"approve": True},
            "n/a",
        ),
        *modeling_cases(world),
        *live_cases(world),
    ]


def live_cases(world: World) -> list[Case]:
    """Stopping is allowed at any time and idempotent: the first allowed stop ends the session,
    the others find it ended."""
    sessions = "/v1/ingestion/live/sessions"
    one = f"{sessions}/{{session_id}}"
    session = f"{sessions}/{world.live_session_id}"
    return [
        Case("GET", sessions, sessions, "viewer", 200, via_share="n/a"),
        # An allowed start reaches validation: an empty body is a 422, nothing started.
        Case("POST", sessions, sessions, "editor", 422, {}, "n/a"),
        Case("GET", one, session, "viewer", 200, via_share="n/a"),
        Case("POST", f"{one}/stop", f"{session}/stop", "editor", 202, {"reason": "x"}, "n/a"),
    ]


def modeling_cases(world: World) -> list[Case]:
    """The session has nothing committed: every allowed change is refused by its state (409)
    or its body (422), so none is written."""
    sessions = "/v1/modeling/sessions"
    one = f"{sessions}/{{session_id}}"
    session = f"{sessions}/{world.session_id}"
    return [
        Case("GET", sessions, sessions, "viewer", 200, via_share="n/a"),
        Case("POST", sessions, sessions, "editor", 422, {"bogus": 1}, "n/a"),
        Case("GET", one, session, "viewer", 200, via_share="n/a"),
        Case(
            "POST",
            f"{one}/steps/{{step}}/commit",
            f"{session}/steps/2/commit",
            "editor",
            409,
            {"payload": {}},
            "n/a",
        ),
        Case(
            "POST",
            f"{one}/steps/{{step}}/reopen",
            f"{session}/steps/1/reopen",
            "editor",
            409,
            {},
            "n/a",
        ),
        Case("POST", f"{one}/manual", f"{session}/manual", "editor", 422, {"yaml": "x: 1"}, "n/a"),
        Case(
            "POST",
            f"{one}/execution/cancel",
            f"{session}/execution/cancel",
            "editor",
            409,
            {},
            "n/a",
        ),
        Case("POST", f"{one}/promote", f"{session}/promote", "editor", 409, {}, "n/a"),
        Case("GET", f"{one}/decisions", f"{session}/decisions", "viewer", 200, via_share="n/a"),
        Case(
            "POST", f"{one}/preview/silver", f"{session}/preview/silver", "viewer", 422, {}, "n/a"
        ),
        Case("POST", f"{one}/preview/gold", f"{session}/preview/gold", "viewer", 422, {}, "n/a"),
    ]


MEMBERS = {"olivia": "owner", "adam": "admin", "eddie": "editor", "vera": "viewer"}
OUTSIDERS = ("wendy", "stranger")  # the owner of another workspace; a member of none


def test_the_matrix_covers_every_route(stack: AccessStack) -> None:
    covered = {(case.method, case.route) for case in cases(stack.world)}
    routes = {
        (method, route.path)
        for route in api_routes()
        if route.path not in PUBLIC_PATHS
        for method in route.methods or ()
    }
    untested = routes - covered - {("POST", "/v1/workspaces"), ("GET", "/v1/workspaces")}
    assert untested == set(), f"add these routes to the matrix: {sorted(untested)}"


def call(stack: AccessStack, subject: str, case: Case, workspace: str) -> httpx.Response:
    token = mint_token(stack.settings(), subject)
    params = dict(case.query) | (
        {"workspace": workspace}
        if case.path.startswith(("/v1/jobs", "/v1/serving", "/v1/modeling", "/v1/ingestion"))
        or case.path in ("/v1/experiments",)
        else {}
    )
    return httpx.request(
        case.method,
        stack.base_url + case.path,
        params=params,
        json=case.json,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30.0,
    )


@pytest.mark.parametrize("subject", [*MEMBERS, *OUTSIDERS, "gvera"])
def test_cross_tenant_matrix(stack: AccessStack, subject: str) -> None:
    for case in cases(stack.world):
        before = stack.run(stack.fingerprint())
        where = f"{subject}: {case.method} {case.path}"
        if subject == "gvera":
            # A reader of the workspace the job is shared with, acting there.
            if case.via_share == "n/a":
                response = call(stack, subject, case, "acme")
                assert response.status_code == 404, where
                continue
            response = call(stack, subject, case, "globex")
            expected = case.allowed_status if case.via_share == "allowed" else 403
            assert response.status_code == expected, f"{where}: {response.text}"
        elif subject in MEMBERS:
            response = call(stack, subject, case, "acme")
            allowed = RANK[MEMBERS[subject]] >= RANK[case.least_role]
            expected = case.allowed_status if allowed else 403
            assert response.status_code == expected, f"{where}: {response.text}"
            if not allowed:
                assert re.search(r"lacks can_\w+ on", response.json()["detail"]), where
        else:
            response = call(stack, subject, case, "acme")
            assert response.status_code == 404, f"{where}: {response.text}"
            assert "not found" in response.json()["detail"], where
        if response.status_code in (403, 404) and case.allowed_status != 404:
            assert stack.run(stack.fingerprint()) == before, f"{where} changed the store"


def test_a_private_job_is_invisible_from_the_other_workspace(stack: AccessStack) -> None:
    private = f"/v1/jobs/experiments/{stack.world.private_job}"
    token = mint_token(stack.settings(), "gvera")
    headers = {"Authorization": f"Bearer {token}"}
    for path in (private, f"{private}/runs", f"{private}/events"):
        response = httpx.get(stack.base_url + path, params={"workspace": "globex"}, headers=headers)
        assert response.status_code == 404, path
        assert response.json()["detail"].startswith(f"experiment job {stack.world.private_job}")
    own = httpx.get(
        f"{stack.base_url}/v1/jobs/experiments/{stack.world.shared_job}",
        params={"workspace": "globex"},
        headers=headers,
    )
    assert own.status_code == 200
    assert own.json()["workspace"] == "acme"


# --- quotas -------------------------------------------------------------------------------------

SMALL = {"experiment": "experiments/es_derivative_sweep.yaml"}


def submit(stack: AccessStack, workspace: str) -> httpx.Response:
    token = mint_token(stack.settings(), "quinn")
    return httpx.post(
        f"{stack.base_url}/v1/jobs/experiments",
        params={"workspace": workspace},
        json=SMALL,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60.0,
    )


async def quota_workspace(stack: AccessStack, slug: str, limits: dict[str, int | None]) -> str:
    async with stack.sessions.begin() as session:
        workspace = await governance.create_owned_workspace(session, slug, slug, "quinn")
        await governance.set_quotas(session, workspace.id, limits)
        return workspace.id


async def job_count(stack: AccessStack, workspace_id: str) -> int:
    async with stack.sessions() as session:
        return len(await repo.list_jobs(session, workspace_id))


def test_concurrent_submissions_take_at_most_the_job_quota(stack: AccessStack) -> None:
    """No worker serves this stack, so accepted jobs stay queued and hold their slot."""
    workspace_id = stack.run(quota_workspace(stack, "busy", {"max_concurrent_jobs": 2}))
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda _: submit(stack, "busy"), range(4)))
    codes = sorted(response.status_code for response in responses)
    assert codes == [202, 202, 429, 429], [r.text for r in responses]
    refusal = next(r for r in responses if r.status_code == 429).json()
    assert refusal["quota"] == {"quota": "max_concurrent_jobs", "limit": 2, "current": 2}
    assert "limit of 2 (current use 2)" in refusal["detail"]
    assert stack.run(job_count(stack, workspace_id)) == 2


def test_a_workspace_over_its_storage_quota_cannot_submit(stack: AccessStack) -> None:
    workspace_id = stack.run(quota_workspace(stack, "full", {"max_storage_bytes": 1500}))
    first = submit(stack, "full")
    assert first.status_code == 202, first.text

    async def store_artifacts() -> None:
        async with stack.sessions.begin() as session:
            job_id = first.json()["id"]
            for index, size in enumerate((1000, 700)):
                await repo.add_artifact(
                    session, workspace_id, job_id, "silver", f"/lake/{index}", "f" * 64, size
                )

    stack.run(store_artifacts())
    refused = submit(stack, "full")
    assert refused.status_code == 429, refused.text
    assert refused.json()["quota"] == {"quota": "max_storage_bytes", "limit": 1500, "current": 1700}
    assert stack.run(job_count(stack, workspace_id)) == 1
