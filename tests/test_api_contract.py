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
from api.routes import experiment_jobs, experiments, health
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


LOOKUP_ERRORS = frozenset({"401", "404", "422"})
PUBLIC = {("get", "/v1/health")}
CONTRACT = {
    ("get", "/v1/health"): Operation("200", "Health", frozenset()),
    ("post", "/v1/jobs/experiments"): Operation(
        "202",
        "SubmittedJob",
        frozenset({"401", "404", "422", "503"}),
        body="ExperimentSubmission",
    ),
    ("get", "/v1/jobs/experiments"): Operation("200", "JobList", LOOKUP_ERRORS),
    ("get", JOB): Operation("200", "JobDetail", LOOKUP_ERRORS),
    ("post", f"{JOB}/cancel"): Operation(
        "202", "Job", frozenset({"401", "404", "409", "422", "503"})
    ),
    ("get", f"{JOB}/events"): Operation("200", None, LOOKUP_ERRORS),
    ("get", f"{JOB}/runs"): Operation("200", "RunPage", LOOKUP_ERRORS),
    ("get", f"{JOB}/runs/{{point_hash}}"): Operation("200", "RunDetail", LOOKUP_ERRORS),
    ("get", "/v1/experiments"): Operation("200", "ExperimentList", LOOKUP_ERRORS),
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
    routers = (health.router, experiment_jobs.router, experiments.router)
    served = {
        (method.lower(), route.path)
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
    assert set(responses) == {expected.success} | expected.errors
    if expected.response is not None:
        success = responses[expected.success]["content"]["application/json"]["schema"]
        assert success == {"$ref": SCHEMAS + expected.response}
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
    assert set(schemas["Problem"]["properties"]) == {"detail", "issues"}
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
    assert submission["properties"]["workspace"]["default"] == "default"
    assert set(submission["properties"]) == {
        "workspace",
        "experiment",
        "spec",
        "name",
        "chunk_points",
        "max_concurrent_chunks",
    }
