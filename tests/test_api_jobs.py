"""The experiment jobs API end to end: a Temporal dev server, an in-process sweep worker, a SQLite
store and the app served by uvicorn, all on one event loop in a background thread; the tests talk
HTTP to it, with a token of the stack's dev issuer, and run coroutines on that loop to look at
Temporal and the store directly. Sweeps run on the ES twenty-minute configs of
``tests/sweep_stack.py``; the module shares one stack."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
import yaml
from httpx_sse import ServerSentEvent, connect_sse
from temporalio.client import Client

from activities.sweep import SweepActivities, load_sweep
from api.app import create_app
from api.job_models import JobDetail, SubmittedJob
from api.jobs_service import effective_concurrency
from qmachina.auth import mint_token
from qmachina.settings import Settings, load_settings
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.identity import spec_hash
from qmachina.specs.yaml_loader import load_spec
from qmachina.store import governance
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.store.models import AuditEvent, ExperimentJob, ExperimentRun
from qmachina.temporal_names import (
    JOB_KIND_ATTRIBUTE,
    SPEC_HASH_ATTRIBUTE,
    WORKSPACE_ATTRIBUTE,
    sweep_workflow_id,
)
from tests.es_grid import SMALL_EXPERIMENT
from tests.live_server import BackgroundLoop, start_dev_server
from tests.sweep_stack import FAILING_EXPERIMENT, Roots
from worker.main import sweep_worker
from workflows.experiment_sweep import SweepRequest

T = TypeVar("T")
JOBS = "/v1/jobs/experiments"
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)
SUBJECT = "researcher"
"""Who the tests call the API as: every change is audited as this subject."""


class LiveApi(BackgroundLoop):
    """The stack on its own event loop: ``run`` executes a coroutine there and waits for it."""

    def __init__(self, roots: Roots, data_dir: Path) -> None:
        self.roots = roots
        self.data_dir = data_dir
        self.store_url = default_sqlite_url(data_dir)
        super().__init__("api-stack")

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": self.data_dir,
            "database_url": self.store_url,
            "temporal_address": self.client.service_client.config.target_host,
            "configs_dir": self.roots.configs,
            "sample_data_dir": self.roots.data,
            "lake_dir": self.roots.lake,
        }
        return load_settings(**(values | overrides))

    async def start(self) -> None:
        self.default_workspace_id = await bootstrap_store(self.store_url, owner=SUBJECT)
        env = await self.resources.enter_async_context(await start_dev_server())
        self.client: Client = env.client
        engine = create_store_engine(self.store_url)
        self.resources.push_async_callback(engine.dispose)
        self.sessions = session_factory(engine)
        await self.resources.enter_async_context(
            sweep_worker(env.client, SweepActivities(self.sessions))
        )
        self.token = mint_token(self.settings(), SUBJECT)
        self.base_url = await self.serve(create_app(self.settings()))

    def http(self, base_url: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=base_url or self.base_url,
            timeout=30.0,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    async def add_workspace(self, slug: str, max_concurrent_chunks: int | None = None) -> str:
        """A workspace owned by :data:`SUBJECT`."""
        async with self.sessions.begin() as session:
            workspace = await governance.create_owned_workspace(
                session, slug, slug.title(), SUBJECT
            )
            await governance.set_quotas(
                session, workspace.id, {"max_concurrent_chunks": max_concurrent_chunks}
            )
            return workspace.id

    async def jobs(self) -> list[ExperimentJob]:
        async with self.sessions() as session:
            return list(await session.scalars(sa.select(ExperimentJob)))

    async def runs(self, job_id: str) -> list[ExperimentRun]:
        async with self.sessions() as session:
            rows = await session.scalars(
                sa.select(ExperimentRun).where(ExperimentRun.job_id == job_id)
            )
            return list(rows)

    async def audit(self, workspace_id: str) -> list[AuditEvent]:
        async with self.sessions() as session:
            rows = await session.scalars(
                sa.select(AuditEvent).where(AuditEvent.workspace_id == workspace_id)
            )
            return list(rows)

    async def sweep_workflows(self) -> set[str]:
        found = self.client.list_workflows("WorkflowType='ExperimentSweep'")
        return {execution.id async for execution in found}

    async def sweep_request(self, workflow_id: str) -> SweepRequest:
        """The input the workflow was started with, from its history."""
        history = await self.client.get_workflow_handle(workflow_id).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        [request] = await self.client.data_converter.decode(started.input.payloads, [SweepRequest])
        assert isinstance(request, SweepRequest)
        return request


@pytest.fixture(scope="module")
def api(sweep_roots: Roots, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    live = LiveApi(sweep_roots, tmp_path_factory.mktemp("api"))
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


def read_events(
    http: httpx.Client,
    job_id: str,
    *,
    workspace: str = "default",
    last_event_id: int | None = None,
    stop_after: int | None = None,
) -> list[ServerSentEvent]:
    """The job's event stream read to its end, or until ``stop_after`` events (then the
    connection is dropped, as a client going away would)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    events: list[ServerSentEvent] = []
    with connect_sse(
        http,
        "GET",
        f"{JOBS}/{job_id}/events",
        params={"workspace": workspace},
        headers=headers,
        timeout=STREAM_TIMEOUT,
    ) as source:
        assert source.response.status_code == 200, source.response.read()
        for event in source.iter_sse():
            if not event.data:  # a keep-alive comment while the sweep is quiet
                continue
            events.append(event)
            if len(events) == stop_after:
                break
    return events


def wire(events: list[ServerSentEvent]) -> list[tuple[int, str, Any]]:
    return [(int(e.id), e.event, json.loads(e.data)) for e in events]


@dataclass(frozen=True)
class SweptJob:
    """A job submitted through the API and followed over SSE to its end: its first event read
    live, the connection dropped, and the rest read after resuming with ``Last-Event-ID``."""

    submitted: dict[str, Any]
    first: list[ServerSentEvent]
    rest: list[ServerSentEvent]

    @property
    def id(self) -> str:
        return str(self.submitted["id"])


def submit_and_follow(api: LiveApi, body: dict[str, Any]) -> SweptJob:
    with api.http() as http:
        response = http.post(JOBS, json=body)
        assert response.status_code == 202, response.text
        submitted = response.json()
        first = read_events(http, submitted["id"], stop_after=1)
        rest = read_events(http, submitted["id"], last_event_id=int(first[0].id))
    return SweptJob(submitted, first, rest)


@pytest.fixture(scope="module")
def small_job(api: LiveApi) -> SweptJob:
    """The sixteen-point ES experiment, named by its path, in chunks of four."""
    return submit_and_follow(api, {"experiment": "experiments/es_small.yaml", "chunk_points": 4})


@pytest.fixture(scope="module")
def failing_job(api: LiveApi) -> SweptJob:
    """Eight points sent inline, four of which the signal refuses."""
    return submit_and_follow(api, {"spec": yaml.safe_load(FAILING_EXPERIMENT)})


def ranked(runs: list[ExperimentRun], metric: str, *, descending: bool) -> list[str]:
    """Point hashes by a metric, independently of the store: runs without it last, ties by
    point hash."""

    def value(run: ExperimentRun) -> float | None:
        span, name = metric.split(".")
        found = run.metrics.get(span, {}).get(name)
        return None if found is None else float(found)

    with_value = [r for r in runs if value(r) is not None]
    without = sorted((r for r in runs if value(r) is None), key=lambda r: r.point_hash)
    with_value.sort(key=lambda r: r.point_hash)
    with_value.sort(key=lambda r: value(r) or 0.0, reverse=descending)
    return [r.point_hash for r in with_value + without]


def test_a_submitted_sweep_streams_to_its_end_and_records_every_point(
    api: LiveApi, small_job: SweptJob
) -> None:
    submitted = small_job.submitted
    SubmittedJob.model_validate(submitted)  # the body is what the contract declares
    spec = load_spec(api.roots.configs / "experiments" / "es_small.yaml", ExperimentSpec)
    workflow_id = sweep_workflow_id(api.default_workspace_id, small_job.id)
    assert submitted["status"] == "queued"
    assert submitted["spec_hash"] == spec_hash(spec)
    assert submitted["workflow_id"] == workflow_id
    assert (submitted["experiment"], submitted["chunk_points"]) == ("experiments/es_small.yaml", 4)
    assert submitted["max_concurrent_chunks"] == spec.parallelism.max_concurrent_chunks
    assert submitted["links"]["events"] == f"{JOBS}/{small_job.id}/events?workspace=default"

    events = wire(small_job.first + small_job.rest)
    assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1))
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "job_submitted"
    assert "sweep_planned" in kinds
    assert kinds[-1] == "sweep_finished"
    assert events[-1][2]["state"] == "succeeded"

    with api.http() as http:
        job = http.get(f"{JOBS}/{small_job.id}").json()
    JobDetail.model_validate(job)
    runs = api.run(api.runs(small_job.id))
    points = load_sweep(api.roots.source("es_small")).points
    assert sorted(r.point_hash for r in runs) == sorted(p.point_hash for p in points)
    assert job["status"] == "succeeded"
    assert job["counts"] == {"succeeded": 16, "failed": 0}
    assert job["progress"] is None  # finished: the counts come from the store
    assert job["objective"] == "total_pnl_ticks"
    best = ranked(runs, "train.total_pnl_ticks", descending=True)[0]
    assert job["best_run"]["point_hash"] == best
    best_run = next(r for r in runs if r.point_hash == best)
    assert job["best_run"]["value"] == best_run.metrics["train"]["total_pnl_ticks"]

    description = api.run(api.client.get_workflow_handle(workflow_id).describe())
    attributes = description.typed_search_attributes
    assert attributes.get(WORKSPACE_ATTRIBUTE) == api.default_workspace_id
    assert attributes.get(JOB_KIND_ATTRIBUTE) == "experiment_sweep"
    assert attributes.get(SPEC_HASH_ATTRIBUTE) == spec_hash(spec)
    audit = [a for a in api.run(api.audit(api.default_workspace_id)) if a.target == small_job.id]
    assert [(a.actor, a.action) for a in audit] == [(SUBJECT, "experiment_job.submit")]


def test_last_event_id_resumes_after_the_given_event(api: LiveApi, small_job: SweptJob) -> None:
    first_id = int(small_job.first[0].id)
    with api.http() as http:
        replay = wire(read_events(http, small_job.id))
        assert replay == wire(small_job.first + small_job.rest)
        assert wire(small_job.rest) == [e for e in replay if e[0] > first_id]
        for after in (2, len(replay) - 1, len(replay)):
            assert wire(read_events(http, small_job.id, last_event_id=after)) == replay[after:]


def test_a_bad_spec_is_rejected_with_every_field_and_nothing_starts(api: LiveApi) -> None:
    archive = api.data_dir / "specs" / "experiments"
    bad_file = api.roots.configs / "experiments" / "api_bad.yaml"
    bad_file.write_text(
        SMALL_EXPERIMENT.replace("sl_ticks: 2", "sl_ticks: 0").replace(
            "name: es_small", "name: es_small\nowner: me"
        )
    )
    inline = yaml.safe_load(SMALL_EXPERIMENT)
    inline["eval"]["tp_ticks"] = [0, 2]
    unknown_param = yaml.safe_load(SMALL_EXPERIMENT)
    unknown_param["sweep"]["signal_params"]["bogus"] = [1]
    jobs_before = len(api.run(api.jobs()))
    workflows_before = api.run(api.sweep_workflows())
    archived_before = sorted(archive.iterdir()) if archive.is_dir() else []
    try:
        with api.http() as http:
            from_file = http.post(JOBS, json={"experiment": "experiments/api_bad.yaml"})
            from_inline = http.post(JOBS, json={"spec": inline})
            bad_param = http.post(JOBS, json={"spec": unknown_param})
            missing = http.post(JOBS, json={"experiment": "experiments/none.yaml"})
            outside = http.post(JOBS, json={"experiment": "../configs/experiments/es_small.yaml"})
            both = http.post(JOBS, json={"experiment": "experiments/es_small.yaml", "spec": {}})
    finally:
        bad_file.unlink()

    for response in (from_file, from_inline, bad_param, missing, outside, both):
        assert response.status_code == 422, response.text
    owner, sl_ticks = from_file.json()["issues"]
    assert owner["message"].startswith("unknown field 'owner'")
    assert [owner | {"message": ""}, sl_ticks] == [
        {"field": "owner", "message": "", "file": "experiments/api_bad.yaml", "line": 2},
        {
            "field": "eval.sl_ticks[0]",
            "message": "Input should be greater than 0",
            "file": "experiments/api_bad.yaml",
            "line": 7,
        },
    ]
    assert from_inline.json()["issues"] == [
        {
            "field": "spec.eval.tp_ticks[0]",
            "message": "Input should be greater than 0",
            "file": None,
            "line": None,
        }
    ]
    [param_issue] = bad_param.json()["issues"]
    assert param_issue["field"] == "spec.sweep.signal_params.bogus[0]"
    assert "has no parameter 'bogus'" in param_issue["message"]
    [missing_issue] = missing.json()["issues"]
    assert missing_issue == {
        "field": "experiment",
        "message": "file not found",
        "file": "experiments/none.yaml",
        "line": None,
    }
    assert outside.json()["issues"][0]["field"] == "experiment"
    assert "not a path inside the configs root" in outside.json()["issues"][0]["message"]
    [both_issue] = both.json()["issues"]
    assert both_issue["field"] == "body"
    assert "exactly one of `experiment`" in both_issue["message"]

    assert len(api.run(api.jobs())) == jobs_before
    assert (sorted(archive.iterdir()) if archive.is_dir() else []) == archived_before
    for _ in range(5):  # a workflow started by mistake would be listed within a second
        assert api.run(api.sweep_workflows()) == workflows_before
        time.sleep(0.2)


def test_cancel_ends_the_job_canceled_within_the_workspace_bound(api: LiveApi) -> None:
    workspace_id = api.run(api.add_workspace("limited", max_concurrent_chunks=1))
    body = {
        "experiment": "experiments/es_derivative_sweep.yaml",
        "chunk_points": 2,
        "max_concurrent_chunks": 3,
    }
    with api.http() as http:
        submitted = http.post(JOBS, params={"workspace": "limited"}, json=body)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        running = http.get(f"{JOBS}/{job_id}", params={"workspace": "limited"}).json()
        canceled = http.post(f"{JOBS}/{job_id}/cancel", params={"workspace": "limited"})
        events = wire(read_events(http, job_id, workspace="limited"))
        finished = http.get(f"{JOBS}/{job_id}", params={"workspace": "limited"}).json()
        again = http.post(f"{JOBS}/{job_id}/cancel", params={"workspace": "limited"})

    assert submitted.json()["max_concurrent_chunks"] == 1  # min(3 requested, 1 allowed)
    request = api.run(api.sweep_request(sweep_workflow_id(workspace_id, job_id)))
    assert (request.max_concurrent_chunks, request.chunk_points) == (1, 2)
    assert request.source.configs_root == str(api.roots.configs)
    assert running["status"] in ("queued", "running")
    assert running["progress_error"] is None
    assert running["progress"]["state"] in ("planning", "running")
    assert canceled.status_code == 202, canceled.text
    kinds = [kind for _, kind, _ in events]
    assert kinds.index("cancel_requested") < kinds.index("sweep_finished") == len(kinds) - 1
    assert events[-1][2]["state"] == "canceled"
    assert finished["status"] == "canceled"
    recorded = finished["counts"]["succeeded"] + finished["counts"]["failed"]
    assert recorded == len(api.run(api.runs(job_id))) < 144
    assert again.status_code == 409
    assert again.json()["detail"] == f"experiment job {job_id} is already canceled"
    audit = sorted(api.run(api.audit(workspace_id)), key=lambda a: a.created_at)
    assert [(a.actor, a.action, a.target) for a in audit] == [
        (SUBJECT, "experiment_job.submit", job_id),
        (SUBJECT, "experiment_job.cancel", job_id),
    ]


def test_a_job_is_not_found_from_another_workspace(api: LiveApi, small_job: SweptJob) -> None:
    api.run(api.add_workspace("other"))
    run = api.run(api.runs(small_job.id))[0]
    paths = [
        f"{JOBS}/{small_job.id}",
        f"{JOBS}/{small_job.id}/events",
        f"{JOBS}/{small_job.id}/runs",
        f"{JOBS}/{small_job.id}/runs/{run.point_hash}",
    ]
    with api.http() as http:
        for path in paths:
            assert http.get(path).status_code == 200, path
            other = http.get(path, params={"workspace": "other"})
            assert other.status_code == 404, path
            assert other.json()["detail"].startswith(f"experiment job {small_job.id} not found")
            nowhere = http.get(path, params={"workspace": "nowhere"})
            assert nowhere.status_code == 404, path
            assert nowhere.json()["detail"] == "workspace 'nowhere' not found"
        cancel = http.post(f"{JOBS}/{small_job.id}/cancel", params={"workspace": "other"})
        assert cancel.status_code == 404
        listed = http.get(JOBS, params={"workspace": "other"}).json()
        assert listed == {"jobs": []}
        unknown_run = http.get(f"{JOBS}/{small_job.id}/runs/{'0' * 64}")
        assert unknown_run.status_code == 404


def test_runs_are_sorted_and_filtered_by_a_metric(
    api: LiveApi, small_job: SweptJob, failing_job: SweptJob
) -> None:
    small_runs = api.run(api.runs(small_job.id))
    failing_runs = api.run(api.runs(failing_job.id))

    def page(job: SweptJob, **params: Any) -> dict[str, Any]:
        with api.http() as http:
            response = http.get(f"{JOBS}/{job.id}/runs", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def hashes(body: dict[str, Any]) -> list[str]:
        return [run["point_hash"] for run in body["runs"]]

    by_test_pnl = ranked(small_runs, "test.total_pnl_ticks", descending=True)
    assert hashes(page(small_job)) == by_test_pnl
    paged = page(small_job, sort="test.total_pnl_ticks", order="desc", limit=5, offset=3)
    assert (paged["total"], hashes(paged)) == (16, by_test_pnl[3:8])
    by_hit_rate = ranked(small_runs, "train.hit_rate", descending=False)
    assert hashes(page(small_job, sort="train.hit_rate", order="asc")) == by_hit_rate

    values = sorted(r.metrics["train"]["total_pnl_ticks"] for r in small_runs)
    floor = values[len(values) // 2]
    kept = [r for r in small_runs if r.metrics["train"]["total_pnl_ticks"] >= floor]
    above = page(small_job, sort="train.total_pnl_ticks", min_value=floor)
    assert above["total"] == len(kept) < 16
    assert hashes(above) == ranked(kept, "train.total_pnl_ticks", descending=True)
    assert [run["value"] for run in above["runs"]] == sorted(
        (float(r.metrics["train"]["total_pnl_ticks"]) for r in kept), reverse=True
    )

    failed = page(failing_job, status="failed")
    expected_failed = [r for r in failing_runs if r.status == "failed"]
    assert {r.params["signal_params"]["z_min_periods"] for r in expected_failed} == {700}
    assert sorted(hashes(failed)) == sorted(r.point_hash for r in expected_failed)
    assert failed["total"] == 4
    succeeded = page(failing_job, status="succeeded", sort="train.mean_pnl_ticks")
    assert hashes(succeeded) == ranked(
        [r for r in failing_runs if r.status == "succeeded"],
        "train.mean_pnl_ticks",
        descending=True,
    )
    with api.http() as http:
        bad_sort = http.get(f"{JOBS}/{failing_job.id}/runs", params={"sort": "error.type"})
        detail = http.get(f"{JOBS}/{failing_job.id}/runs/{hashes(failed)[0]}").json()
    assert bad_sort.status_code == 422
    assert bad_sort.json()["issues"][0]["field"] == "query.sort"
    assert detail["status"] == "failed"
    assert detail["error"]["type"] == "SignalError"
    assert "z_min_periods" in detail["error"]["message"]
    assert "Traceback" in detail["error"]["traceback"]
    assert detail["spec_hashes"]["experiment"] == failing_job.submitted["spec_hash"]


def test_an_inline_spec_is_archived_by_its_hash(api: LiveApi, failing_job: SweptJob) -> None:
    submitted = failing_job.submitted
    archived = api.data_dir.resolve() / "specs" / "experiments" / f"{submitted['spec_hash']}.yaml"
    assert submitted["experiment"] == str(archived)
    assert spec_hash(load_spec(archived, ExperimentSpec)) == submitted["spec_hash"]
    assert wire(failing_job.first + failing_job.rest)[-1][2]["state"] == "succeeded"


def test_the_experiment_browser_groups_jobs_by_name(
    api: LiveApi, small_job: SweptJob, failing_job: SweptJob
) -> None:
    with api.http() as http:
        jobs = http.get(JOBS).json()["jobs"]
        experiments = http.get("/v1/experiments").json()["experiments"]
    created = [job["created_at"] for job in jobs]
    assert created == sorted(created, reverse=True)
    by_id = {job["id"]: job for job in jobs}
    assert by_id[small_job.id]["counts"] == {"succeeded": 16, "failed": 0}
    assert by_id[failing_job.id]["counts"] == {"succeeded": 4, "failed": 4}
    groups = {group["name"]: [job["id"] for job in group["jobs"]] for group in experiments}
    assert small_job.id in groups["es_small"]
    assert groups["es_failing"] == [failing_job.id]
    assert sum(len(ids) for ids in groups.values()) == len(jobs)


def test_a_workflow_that_cannot_start_fails_the_job(api: LiveApi) -> None:
    unreachable = api.run(
        api.serve(create_app(api.settings(temporal_namespace="no-such-namespace")))
    )
    jobs_before = {job.id for job in api.run(api.jobs())}
    with api.http(unreachable) as http:
        response = http.post(JOBS, json={"experiment": "experiments/es_small.yaml"})
    assert response.status_code == 503, response.text
    assert "could not be started" in response.json()["detail"]
    [job] = [j for j in api.run(api.jobs()) if j.id not in jobs_before]
    assert job.status == "failed"
    assert job.error is not None
    assert "no-such-namespace" in job.error
    with api.http() as http:
        events = wire(read_events(http, job.id))
    assert [kind for _, kind, _ in events] == ["job_submitted", "sweep_finished"]
    assert events[-1][2]["state"] == "failed"


@pytest.mark.parametrize(
    ("requested", "spec_value", "workspace_limit", "expected"),
    [(None, 2, None, 2), (5, 2, None, 5), (5, 2, 3, 3), (None, 4, 1, 1), (1, 4, 3, 1)],
)
def test_effective_concurrency(
    requested: int | None, spec_value: int, workspace_limit: int | None, expected: int
) -> None:
    assert effective_concurrency(requested, spec_value, workspace_limit) == expected
