"""The OpenAPI document is the API's contract: every route is declared under ``/v1`` with its
request and response models, every error answers the one ``Problem`` body, and every route but
health requires the bearer token its security scheme declares."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from api.app import create_app
from api.routes import (
    experiment_jobs,
    experiments,
    health,
    live,
    modeling,
    promotions,
    serving,
    workspaces,
)
from qmachina.settings import load_settings
from qmachina.store.models import JOB_STATUSES, RUN_STATUSES
from workflows.experiment_sweep import SweepProgress

SCHEMAS = "#/components/schemas/"
JOB = "/v1/jobs/experiments/{job_id}"


@dataclass(frozen=True)
class Operation:
    success: str
    response: str | None
    errors: frozenset[str]
    body: str | None = None
    also: frozenset[str] = frozenset()
    """Other successes, answering the same model (a registration of known content: 200)."""


LOOKUP_ERRORS = frozenset({"401", "404", "422", "503"})
"""Every protected route: no token (401), the object unseen (404), a bad request (422), and an
issuer, authorizer or Temporal out of reach (503)."""
REFUSABLE = LOOKUP_ERRORS | {"403"}
"""A route that needs more than reading: a member without the relation is refused (403)."""
PUBLIC = {("get", "/v1/health")}
WS = "/v1/workspaces/{workspace}"
SERVING = "/v1/serving"
SESSIONS = "/v1/modeling/sessions"
SESSION = f"{SESSIONS}/{{session_id}}"
LIVE = "/v1/ingestion/live/sessions"
CONTRACT = {
    ("get", "/v1/health"): Operation("200", "Health", frozenset()),
    ("post", "/v1/jobs/experiments"): Operation(
        "202", "SubmittedJob", REFUSABLE | {"429"}, body="ExperimentSubmission"
    ),
    ("get", "/v1/jobs/experiments"): Operation("200", "JobList", LOOKUP_ERRORS),
    ("get", JOB): Operation("200", "JobDetail", LOOKUP_ERRORS),
    ("post", f"{JOB}/cancel"): Operation("202", "Job", REFUSABLE | {"409"}),
    ("put", f"{JOB}/shares/{{target}}"): Operation("204", None, REFUSABLE | {"409"}),
    ("delete", f"{JOB}/shares/{{target}}"): Operation("204", None, REFUSABLE),
    ("get", f"{JOB}/events"): Operation("200", None, LOOKUP_ERRORS),
    ("get", f"{JOB}/runs"): Operation("200", "RunPage", LOOKUP_ERRORS),
    ("get", f"{JOB}/runs/{{point_hash}}"): Operation("200", "RunDetail", LOOKUP_ERRORS),
    ("get", "/v1/experiments"): Operation("200", "ExperimentList", LOOKUP_ERRORS),
    ("post", "/v1/workspaces"): Operation(
        "201", "Workspace", frozenset({"401", "409", "422", "503"}), body="WorkspaceCreate"
    ),
    ("get", "/v1/workspaces"): Operation("200", "WorkspaceList", frozenset({"401", "503"})),
    ("get", WS): Operation("200", "WorkspaceDetail", LOOKUP_ERRORS),
    ("get", f"{WS}/members"): Operation("200", "MemberList", LOOKUP_ERRORS),
    ("put", f"{WS}/members/{{subject}}"): Operation(
        "200", "MemberChange", REFUSABLE | {"409"}, body="MemberRole"
    ),
    ("delete", f"{WS}/members/{{subject}}"): Operation("204", None, REFUSABLE | {"409"}),
    ("get", f"{WS}/quotas"): Operation("200", "WorkspaceQuotas", LOOKUP_ERRORS),
    ("patch", f"{WS}/quotas"): Operation("200", "WorkspaceQuotas", REFUSABLE, body="QuotaPatch"),
    ("get", f"{WS}/audit"): Operation("200", "AuditPage", REFUSABLE),
    ("post", f"{SERVING}/versions"): Operation(
        "201",
        "RegisteredVersion",
        REFUSABLE | {"409"},
        body="VersionRegistration",
        also=frozenset({"200"}),
    ),
    ("get", f"{SERVING}/versions"): Operation("200", "VersionList", LOOKUP_ERRORS),
    ("get", f"{SERVING}/versions/{{version_id}}"): Operation(
        "200", "ServingVersionDetail", LOOKUP_ERRORS | {"409"}
    ),
    ("get", f"{SERVING}/aliases"): Operation("200", "AliasList", LOOKUP_ERRORS),
    ("get", f"{SERVING}/aliases/{{alias}}"): Operation("200", "AliasDetail", LOOKUP_ERRORS),
    ("put", f"{SERVING}/aliases/{{alias}}"): Operation(
        "200", "AliasChange", REFUSABLE | {"409"}, body="AliasRepoint"
    ),
    ("post", f"{SERVING}/aliases/{{alias}}/rollback"): Operation(
        "200", "AliasChange", REFUSABLE | {"409"}, body="AliasRollback"
    ),
    ("get", f"{SERVING}/diff"): Operation("200", "SnapshotDiff", LOOKUP_ERRORS | {"409"}),
    ("post", f"{SERVING}/promotions"): Operation(
        "202", "PromotionView", REFUSABLE | {"409"}, body="PromotionStart"
    ),
    ("get", f"{SERVING}/promotions/{{alias}}"): Operation("200", "PromotionView", LOOKUP_ERRORS),
    ("post", f"{SERVING}/promotions/{{alias}}/decision"): Operation(
        "200", "PromotionView", REFUSABLE | {"409"}, body="DecisionBody"
    ),
    ("post", SESSIONS): Operation("201", "SessionView", REFUSABLE, body="SessionStart"),
    ("get", SESSIONS): Operation("200", "SessionPage", LOOKUP_ERRORS),
    ("get", SESSION): Operation("200", "SessionView", LOOKUP_ERRORS),
    ("post", f"{SESSION}/steps/{{step}}/commit"): Operation(
        "200", "SessionView", REFUSABLE | {"409", "429"}, body="StepCommitBody"
    ),
    ("post", f"{SESSION}/steps/{{step}}/reopen"): Operation(
        "200", "SessionView", REFUSABLE | {"409"}, body="StepReopenBody"
    ),
    ("post", f"{SESSION}/manual"): Operation(
        "200", "SessionView", REFUSABLE | {"409"}, body="ManualModelBody"
    ),
    ("post", f"{SESSION}/execution/cancel"): Operation(
        "200", "SessionView", REFUSABLE | {"409"}, body="ActionBody"
    ),
    ("post", f"{SESSION}/promote"): Operation(
        "200", "SessionView", REFUSABLE | {"409"}, body="ActionBody"
    ),
    ("get", f"{SESSION}/decisions"): Operation("200", "DecisionLog", LOOKUP_ERRORS),
    ("post", f"{SESSION}/preview/silver"): Operation(
        "200", "SilverPreview", LOOKUP_ERRORS, body="PreviewBody"
    ),
    ("post", f"{SESSION}/preview/gold"): Operation(
        "200", "GoldPreview", LOOKUP_ERRORS, body="PreviewBody"
    ),
    ("post", LIVE): Operation("201", "LiveSessionView", REFUSABLE, body="LiveSessionStart"),
    ("get", LIVE): Operation("200", "LiveSessionPage", LOOKUP_ERRORS),
    ("get", f"{LIVE}/{{session_id}}"): Operation("200", "LiveSessionView", LOOKUP_ERRORS),
    ("post", f"{LIVE}/{{session_id}}/stop"): Operation(
        "202", "LiveSessionView", REFUSABLE, body="StopBody"
    ),
}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``/openapi.json`` as served (the document needs no Temporal nor store)."""
    app = create_app(load_settings(data_dir=tmp_path_factory.mktemp("contract")))

    async def fetch() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            response = await client.get("/openapi.json")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    return asyncio.run(fetch())


def test_every_route_is_declared_under_v1(document: dict[str, Any]) -> None:
    routers = (
        health.router,
        experiment_jobs.router,
        experiments.router,
        workspaces.router,
        serving.router,
        promotions.router,
        modeling.router,
        live.router,
    )
    served = {
        # The document names a path parameter without its Starlette converter (`:path`).
        (method.lower(), route.path.replace(":path}", "}"))
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    declared = {
        (method, path) for path, operations in document["paths"].items() for method in operations
    }
    assert served == declared == set(CONTRACT)
    assert all(path.startswith("/v1/") for _, path in declared)


@pytest.mark.parametrize(("method", "path"), sorted(CONTRACT))
def test_each_route_declares_its_models(document: dict[str, Any], method: str, path: str) -> None:
    expected = CONTRACT[(method, path)]
    operation = document["paths"][path][method]
    if expected.body is None:
        assert "requestBody" not in operation
    else:
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": SCHEMAS + expected.body}
    responses = operation["responses"]
    assert set(responses) == {expected.success} | expected.also | expected.errors
    if expected.response is not None:
        for code in {expected.success} | expected.also:
            success = responses[code]["content"]["application/json"]["schema"]
            assert success == {"$ref": SCHEMAS + expected.response}, code
    for code in expected.errors:
        assert responses[code]["content"] == {
            "application/json": {"schema": {"$ref": SCHEMAS + "Problem"}}
        }, f"{method.upper()} {path} {code}"


@pytest.mark.parametrize(("method", "path"), sorted(CONTRACT))
def test_each_route_but_health_requires_a_bearer_token(
    document: dict[str, Any], method: str, path: str
) -> None:
    operation = document["paths"][path][method]
    if (method, path) in PUBLIC:
        assert "security" not in operation
    else:
        assert operation["security"] == [{"bearer": []}], f"{method.upper()} {path}"


def test_the_bearer_scheme_is_declared(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == {"bearer"}
    assert schemes["bearer"]["type"] == "http"
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["bearer"]["bearerFormat"] == "JWT"
    # The dev issuer's discovery routes are protocol endpoints, not part of the /v1 contract.
    assert not [path for path in document["paths"] if path.startswith("/.well-known")]


def test_every_error_is_a_problem(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's default 422 body is replaced
    assert set(schemas["Problem"]["properties"]) == {"detail", "issues", "quota"}
    assert set(schemas["QuotaUse"]["properties"]) == {"quota", "limit", "current"}
    assert set(schemas["Issue"]["properties"]) == {"field", "message", "file", "line"}


def test_the_event_stream_is_declared(document: dict[str, Any]) -> None:
    operation = document["paths"][f"{JOB}/events"]["get"]
    stream = operation["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]
    assert {"id", "event", "data"} <= set(stream["properties"])
    [resume] = [p for p in operation["parameters"] if p["in"] == "header"]
    assert resume["name"] == "Last-Event-ID"
    assert resume["schema"]["type"] == "integer"
    assert resume["schema"]["minimum"] == 0


def test_the_runs_query_is_declared(document: dict[str, Any]) -> None:
    parameters = {
        p["name"]: p["schema"] for p in document["paths"][f"{JOB}/runs"]["get"]["parameters"]
    }
    assert set(parameters) == {
        "job_id",
        "workspace",
        "sort",
        "order",
        "status",
        "min_value",
        "limit",
        "offset",
    }
    assert parameters["sort"]["default"] == "test.total_pnl_ticks"
    assert parameters["sort"]["pattern"].startswith("^(train|test)")
    assert parameters["order"]["enum"] == ["asc", "desc"]
    assert parameters["limit"]["maximum"] == 1000


def test_statuses_match_the_store(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert tuple(schemas["Job"]["properties"]["status"]["enum"]) == JOB_STATUSES
    assert tuple(schemas["RunDetail"]["properties"]["status"]["enum"]) == RUN_STATUSES


def test_progress_is_the_workflows_own_type(document: dict[str, Any]) -> None:
    progress = document["components"]["schemas"]["SweepProgress"]
    assert set(progress["properties"]) == {f.name for f in dataclasses.fields(SweepProgress)}
    detail = document["components"]["schemas"]["JobDetail"]["properties"]["progress"]
    assert {"$ref": SCHEMAS + "SweepProgress"} in detail["anyOf"]


def test_a_submission_names_one_source(document: dict[str, Any]) -> None:
    submission = document["components"]["schemas"]["ExperimentSubmission"]
    assert submission["additionalProperties"] is False
    assert set(submission["properties"]) == {
        "experiment",
        "spec",
        "name",
        "chunk_points",
        "max_concurrent_chunks",
    }


def test_a_serving_snapshot_is_declared_with_its_specs(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    snapshot = schemas["ServingSnapshot"]["properties"]
    assert set(snapshot) == {"version_id", "content", "lineage"}
    content = schemas["ServingContent"]["properties"]
    assert content["gold"] == {"$ref": SCHEMAS + "GoldSnapshot"}
    assert schemas["GoldSnapshot"]["properties"]["spec"] == {"$ref": SCHEMAS + "GoldSpec"}
    assert schemas["PipelineSnapshot"]["properties"]["instrument"] == {
        "$ref": SCHEMAS + "InstrumentConfig"
    }
    lineage = schemas["Lineage"]["properties"]
    assert {"dataset_files", "experiment_job_id", "run_point_hash", "code_version"} <= set(lineage)
    # A registration names exactly one source: each shape refuses the other's fields.
    assert schemas["VersionRegistration"]["anyOf"] == [
        {"$ref": SCHEMAS + "SpecRegistration"},
        {"$ref": SCHEMAS + "RunRegistration"},
    ]
    for shape, fields in (
        ("SpecRegistration", {"spec"}),
        ("RunRegistration", {"job_id", "point_hash"}),
    ):
        assert schemas[shape]["additionalProperties"] is False
        assert set(schemas[shape]["properties"]) == set(schemas[shape]["required"]) == fields
    assert schemas["DiffEntry"]["properties"]["change"]["enum"] == [
        "changed",
        "added",
        "removed",
        "reordered",
    ]
