"""``qmachina sweep submit|status|cancel|watch|runs``: experiment sweeps through the API.

Every command talks to a running API (``qmachina up``) over HTTP, so a sweep outlives the
terminal that submitted it: ``watch`` follows its Server-Sent Events with a live progress bar and
resumes after a dropped connection from the last event it saw. Each request carries a bearer
token: ``--token`` / ``QMACHINA_TOKEN``, else one minted for the local user by the dev issuer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from httpx_sse import SSEError, connect_sse
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qmachina.auth import DevIssuerError
from qmachina.auth.client import TOKEN_VARIABLE, StaticBearer, api_auth
from qmachina.cli_errors import fail, settings_or_fail
from qmachina.settings import Settings
from qmachina.specs.pipeline import default_configs_root
from qmachina.specs.yaml_loader import load_yaml_document

JOBS_PATH = "/v1/jobs/experiments"
EVAL_PARAMS = ("threshold", "tp_ticks", "sl_ticks", "cooldown_bins")
SHORT_NAMES = {
    "total_pnl_ticks": "pnl",
    "mean_pnl_ticks": "mean pnl",
    "hit_rate": "hit",
    "signals": "trades",
    "threshold": "thr",
    "tp_ticks": "tp",
    "sl_ticks": "sl",
    "cooldown_bins": "cool",
}
TERMINAL_STATES = ("succeeded", "failed", "canceled")
RECONNECT_DELAYS_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)

app = typer.Typer(help="Run experiment sweeps on the stack (see `qmachina up`).")
out = Console(soft_wrap=True, highlight=False)  # ids and URLs are copied from here

ApiOption = Annotated[
    str | None,
    typer.Option("--api", help="The API's base URL (default: from the settings' api_host/port)."),
]
WorkspaceOption = Annotated[str, typer.Option(help="The workspace's slug.")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar=TOKEN_VARIABLE,
        show_envvar=True,
        help="A bearer token for the API (default: with the local dev issuer, one minted for "
        "you from the key in the data directory; see `qmachina token`).",
    ),
]
UNAUTHORIZED_HINT = (
    "  the API wants a valid bearer token: pass --token or set QMACHINA_TOKEN (with the local "
    "dev issuer, the commands mint one from the key in the data directory the API uses)"
)


class ApiError(Exception):
    """The API answered with an error, or could not be reached; the message says which."""


def api_base_url(api: str | None) -> str:
    """``--api``, else the API the settings describe."""
    if api:
        return api.rstrip("/")
    settings = settings_or_fail()
    return f"http://{settings.api_host}:{settings.api_port}"


def _problem_lines(response: httpx.Response, spec_file: Path | None) -> list[str]:
    """The API's problem body as lines; fields of an inline spec get their line in the file."""
    try:
        problem = response.json()
    except ValueError:
        return [f"HTTP {response.status_code}: {response.text.strip()}"]
    lines = [f"HTTP {response.status_code}: {problem.get('detail', '')}"]
    document = load_yaml_document(spec_file) if spec_file is not None else None
    for issue in problem.get("issues", []):
        field = str(issue.get("field", ""))
        where = issue.get("file")
        line = issue.get("line")
        if where is None and document is not None and field.startswith("spec."):
            where = str(spec_file)
            line = document.line_of(_field_path(field.removeprefix("spec.")))
        location = f"{where}:{line}: " if where else ""
        lines.append(f"  {location}{field}: {issue.get('message', '')}")
    return lines


def _field_path(field: str) -> list[str | int]:
    """``eval.tp_ticks[0]`` -> ``["eval", "tp_ticks", 0]``."""
    path: list[str | int] = []
    for part in field.split("."):
        name, _, rest = part.partition("[")
        path.append(name)
        for index in rest.rstrip("]").split("]["):
            if index.isdigit():
                path.append(int(index))
    return path


def api_request(
    client: httpx.Client,
    method: str,
    path: str,
    *,
    spec_file: Path | None = None,
    **kwargs: Any,
) -> Any:
    """The API's JSON answer (None for a 204). An error it answers raises :class:`ApiError` with
    its problem as lines (fields of an inline spec located in ``spec_file``), as does failing to
    reach it."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as error:
        raise ApiError(
            f"cannot reach the API at {client.base_url} ({error}); is the stack up? "
            "(`qmachina up`, `qmachina status`)"
        ) from None
    if response.is_error:
        raise ApiError("\n".join(_hinted(_problem_lines(response, spec_file), response)))
    return None if response.status_code == httpx.codes.NO_CONTENT else response.json()


def call_api(
    client: httpx.Client, method: str, path: str, workspace: str | None = None, **kwargs: Any
) -> Any:
    """:func:`api_request` in ``workspace`` (its slug as the ``workspace`` parameter, when
    given) for a command: an error exits 2 with its message."""
    if workspace is not None:
        kwargs["params"] = {**kwargs.get("params", {}), "workspace": workspace}
    try:
        return api_request(client, method, path, **kwargs)
    except ApiError as error:
        raise fail(str(error)) from None


def _hinted(lines: list[str], response: httpx.Response) -> list[str]:
    return [*lines, UNAUTHORIZED_HINT] if response.status_code == 401 else lines


def api_client(base_url: str, auth: httpx.Auth) -> httpx.Client:
    """A client of the API at ``base_url`` sending ``auth``'s bearer token; streams are read
    without a timeout."""
    return httpx.Client(base_url=base_url, auth=auth, timeout=httpx.Timeout(30.0, read=None))


def client_auth(settings: Settings, token: str | None) -> httpx.Auth:
    """``token``, else the dev issuer's tokens for the local user; a clear exit when neither
    can be had."""
    try:
        return api_auth(settings, token)
    except DevIssuerError as error:
        raise fail(f"{error}; pass it with --token or {TOKEN_VARIABLE}") from None


def connect_api(api: str | None, token: str | None) -> httpx.Client:
    """A client of the API (``--api``, else the settings') sending ``--token``, else the dev
    issuer's tokens for the local user."""
    auth = StaticBearer(token) if token else client_auth(settings_or_fail(), None)
    return api_client(api_base_url(api), auth)


def submit_job(
    client: httpx.Client, workspace: str, body: Mapping[str, Any], spec_file: Path | None = None
) -> dict[str, Any]:
    """POST the submission to the workspace; the API's problems (422: every bad field) raise
    :class:`ApiError`, located in ``spec_file`` when the spec was sent inline from it."""
    job: dict[str, Any] = api_request(
        client, "POST", JOBS_PATH, params={"workspace": workspace}, json=body, spec_file=spec_file
    )
    return job


def runs_page(
    client: httpx.Client,
    job_id: str,
    workspace: str,
    *,
    sort: str,
    top: int,
    ascending: bool = False,
) -> dict[str, Any]:
    """The first ``top`` runs of the job by ``sort`` (``train.<metric>`` / ``test.<metric>``)."""
    params = {
        "workspace": workspace,
        "sort": sort,
        "order": "asc" if ascending else "desc",
        "limit": top,
    }
    page: dict[str, Any] = api_request(client, "GET", f"{JOBS_PATH}/{job_id}/runs", params=params)
    return page


def submission_of(
    experiment: Path, chunk_points: int | None, max_concurrent: int | None
) -> dict[str, Any]:
    """A spec under the configs root is submitted by path (the workers read the same file);
    any other file is submitted inline."""
    body: dict[str, Any] = {}
    resolved = experiment.resolve()
    configs = default_configs_root().resolve()
    if resolved.is_relative_to(configs):
        body["experiment"] = resolved.relative_to(configs).as_posix()
    else:
        try:
            body["spec"] = yaml.safe_load(experiment.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise fail(f"{experiment}: {error}") from None
        if not isinstance(body["spec"], dict):
            raise fail(f"{experiment}: an ExperimentSpec is a mapping, not {type(body['spec'])}")
    if chunk_points is not None:
        body["chunk_points"] = chunk_points
    if max_concurrent is not None:
        body["max_concurrent_chunks"] = max_concurrent
    return body


@app.command("submit")
def submit(
    experiment: Annotated[Path, typer.Argument(help="An ExperimentSpec YAML.")],
    workspace: WorkspaceOption = "default",
    chunk_points: Annotated[int | None, typer.Option(min=1, help="Points per chunk.")] = None,
    max_concurrent_chunks: Annotated[
        int | None, typer.Option(min=1, help="Chunks evaluated at once.")
    ] = None,
    watch_progress: Annotated[
        bool, typer.Option("--watch", help="Follow the sweep to its end.")
    ] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Submit a sweep; the API validates the spec first and names every bad field."""
    if not experiment.is_file():
        raise fail(f"{experiment}: file not found")
    body = submission_of(experiment, chunk_points, max_concurrent_chunks)
    inline = experiment if "spec" in body else None
    with connect_api(api, token) as client:
        try:
            job = submit_job(client, workspace, body, inline)
        except ApiError as error:
            raise fail(str(error)) from None
        out.print(f"submitted job [bold]{job['id']}[/] ({job['name']}) in workspace {workspace}")
        out.print(f"  workflow {job['workflow_id']}, spec {job['spec_hash'][:12]}")
        if watch_progress:
            raise typer.Exit(watch_job(client, job["id"], workspace))
        out.print(f"  follow it: qmachina sweep watch {job['id']}")


@app.command("status")
def status(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    workspace: WorkspaceOption = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """A job's state, progress and best run so far."""
    with connect_api(api, token) as client:
        try:
            job = api_request(
                client, "GET", f"{JOBS_PATH}/{job_id}", params={"workspace": workspace}
            )
        except ApiError as error:
            raise fail(str(error)) from None
    if as_json:
        out.print_json(json.dumps(job))
        return
    counts = job["counts"]
    out.print(f"job {job['id']} ({job['name']}): [bold]{job['status']}[/]")
    progress = job.get("progress")
    if progress:
        out.print(
            f"  {progress['points_done']}/{progress['points_total']} points, "
            f"{progress['points_failed']} failed, ETA {_duration(progress.get('eta_seconds'))}"
        )
    out.print(f"  recorded: {counts['succeeded']} succeeded, {counts['failed']} failed")
    best = job.get("best_run")
    if best:
        out.print(f"  best: {best['point_hash'][:12]} train {best['objective']} = {best['value']}")
    if job.get("error"):
        out.print(f"  error: {job['error']}")


@app.command("cancel")
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Stop a sweep: no new chunk starts, running ones stop, finished points are kept."""
    with connect_api(api, token) as client:
        try:
            job = api_request(
                client, "POST", f"{JOBS_PATH}/{job_id}/cancel", params={"workspace": workspace}
            )
        except ApiError as error:
            raise fail(str(error)) from None
    out.print(f"cancel requested for job {job['id']} (now {job['status']})")


@app.command("watch")
def watch(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Follow a sweep to its end with a live progress bar; exit 0 only if it succeeded."""
    with connect_api(api, token) as client:
        raise typer.Exit(watch_job(client, job_id, workspace))


@app.command("runs")
def runs(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    workspace: WorkspaceOption = "default",
    sort: Annotated[str, typer.Option(help="train.<metric> or test.<metric>.")] = (
        "test.total_pnl_ticks"
    ),
    ascending: Annotated[bool, typer.Option("--ascending", help="Smallest first.")] = False,
    top: Annotated[int, typer.Option(min=1, max=1000, help="Rows to show.")] = 10,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """The job's runs, sorted by a metric."""
    with connect_api(api, token) as client:
        try:
            page = runs_page(client, job_id, workspace, sort=sort, top=top, ascending=ascending)
        except ApiError as error:
            raise fail(str(error)) from None
    out.print(runs_table(page))


def _shown_params(run: Mapping[str, Any]) -> dict[str, Any]:
    params = run["params"]
    shown = dict(params.get("signal_params", {}))
    shown.update({k: params[k] for k in EVAL_PARAMS if k in params})
    return shown


def runs_table(page: Mapping[str, Any]) -> Table:
    """A page of runs: the point, the parameters that differ between its rows, the sorted-by
    metric and the test-span results."""
    rows = [_shown_params(run) for run in page["runs"]]
    varying = [
        name
        for name in dict.fromkeys(name for row in rows for name in row)
        if len({repr(row.get(name)) for row in rows}) > 1
    ]
    span, _, metric = str(page["sort"]).partition(".")
    table = Table(
        title=f"{page['total']} runs by {page['sort']} ({page['order']})", box=box.SIMPLE_HEAD
    )
    table.add_column("#", justify="right")
    table.add_column("point", no_wrap=True)
    for name in varying:
        table.add_column(SHORT_NAMES.get(name, name), justify="right")
    table.add_column(f"{span} {SHORT_NAMES.get(metric, metric)}", justify="right")
    for column in ("test pnl", "test hit", "test trades"):
        table.add_column(column, justify="right")
    for rank, (run, shown) in enumerate(zip(page["runs"], rows, strict=True), 1 + page["offset"]):
        test = run["metrics"].get("test", {})
        table.add_row(
            str(rank),
            run["point_hash"][:8],
            *(_number(shown.get(name)) for name in varying),
            _number(run["value"]),
            _number(test.get("total_pnl_ticks")),
            _number(test.get("hit_rate")),
            _number(test.get("signals")),
        )
    return table


def _number(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def job_events(
    client: httpx.Client, job_id: str, workspace: str, *, after: int = 0
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """The job's events ``(seq, kind, payload)`` after ``after`` to the end of its stream,
    reconnecting from the last seen event when the connection drops."""
    last_seen = after
    failures = 0
    url = f"{JOBS_PATH}/{job_id}/events"
    while True:
        try:
            with connect_sse(
                client,
                "GET",
                url,
                params={"workspace": workspace},
                headers={"Last-Event-ID": str(last_seen)},
            ) as source:
                if source.response.is_error:
                    source.response.read()
                    lines = _problem_lines(source.response, None)
                    raise ApiError("\n".join(_hinted(lines, source.response)))
                for event in source.iter_sse():
                    failures = 0
                    if not event.data:  # a keep-alive comment, not a job event
                        continue
                    last_seen = int(event.id)
                    yield last_seen, event.event, json.loads(event.data)
            return
        except (httpx.TransportError, SSEError) as error:
            if failures >= len(RECONNECT_DELAYS_SECONDS):
                raise ApiError(f"lost the event stream of job {job_id}: {error}") from None
            time.sleep(RECONNECT_DELAYS_SECONDS[failures])
            failures += 1


def watch_job(client: httpx.Client, job_id: str, workspace: str) -> int:
    """Show the job's progress until it ends; returns the exit code: 0 succeeded, 1 otherwise."""
    final: dict[str, Any] = {}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    try:
        with Progress(*columns, console=out, transient=False) as bar:
            task = bar.add_task(f"sweep {job_id[:8]}", total=None, note="waiting for the plan")
            for _, kind, payload in job_events(client, job_id, workspace):
                if kind == "sweep_planned":
                    bar.update(task, total=payload["points_total"], note="running")
                elif kind == "progress":
                    best = payload.get("best")
                    note = f"ETA {_duration(payload.get('eta_seconds'))}"
                    if best:
                        note += f", best {payload['objective']} {best['objective_value']:.4g}"
                    if payload["points_failed"]:
                        note += f", {payload['points_failed']} failed"
                    bar.update(
                        task,
                        total=payload["points_total"],
                        completed=payload["points_done"],
                        note=note,
                    )
                elif kind == "sweep_finished":
                    final = payload
                    bar.update(task, note=payload["state"])
    except ApiError as error:
        raise fail(str(error)) from None
    state = final.get("state", "unknown")
    out.print(
        f"job {job_id} {state}: {final.get('succeeded', 0)} points succeeded, "
        f"{final.get('failed', 0)} failed"
    )
    for key in ("error", "tracking_error"):
        if final.get(key):
            out.print(f"  {key.replace('_', ' ')}: {final[key]}")
    return 0 if state == "succeeded" else 1
