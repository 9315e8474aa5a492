"""Every error the API answers has one body, :class:`Problem`, declared in the OpenAPI document.

Services raise domain errors (an unknown workspace, job, run, serving version or alias, a
rejected spec, a finished job, a run that cannot be served, an unreachable Temporal, a refused
bearer token); the handlers installed by :func:`install_problem_handlers` turn each into its
status code and a ``Problem``; a refused token's 401 also carries the ``WWW-Authenticate``
challenge of RFC 6750. Request validation
errors become a ``Problem`` too, each field named in ``issues``, so a client reads one shape
for every 422.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qmachina.auth import AuthenticationError, KeySetUnavailableError, MissingTokenError
from qmachina.authz.authorizer import AuthorizerUnavailableError
from qmachina.serving.snapshot import (
    LineageError,
    SpecFileNotFoundError,
    UnservableSnapshotError,
)
from qmachina.specs.errors import format_field_path
from qmachina.store.governance import LastOwnerError, MemberNotFoundError, WorkspaceExistsError
from qmachina.store.live_sessions import LiveSessionNotFoundError
from qmachina.store.modeling_sessions import SessionNotFoundError
from qmachina.store.repository import JobNotFoundError, RunNotFoundError, StoreError
from qmachina.store.serving_registry import (
    AliasNotFoundError,
    InvalidRepointError,
    VersionNotFoundError,
)


class Issue(BaseModel):
    """One problem with one field of a request or of a spec file it names."""

    field: str = Field(
        description="The field: a request body field (`chunk_points`, `spec.eval.tp_ticks[0]`), "
        "a query or header parameter (`query.limit`), or a field of `file`"
    )
    message: str
    file: str | None = Field(
        default=None,
        description="The spec file holding the problem, relative to the configs root; "
        "null for the request itself and for an inline `spec`",
    )
    line: int | None = Field(default=None, description="1-based line in `file`")


class QuotaUse(BaseModel):
    """A workspace quota a request would exceed."""

    quota: str = Field(description="`max_concurrent_jobs`, `max_streams` or `max_storage_bytes`")
    limit: int
    current: int = Field(description="What the workspace uses now")


class Problem(BaseModel):
    """The body of every error response."""

    detail: str
    issues: list[Issue] = Field(default_factory=list)
    quota: QuotaUse | None = Field(default=None, description="Set on a 429: the quota reached")


class WorkspaceNotFoundError(LookupError):
    """No workspace has this slug."""

    def __init__(self, slug: str) -> None:
        super().__init__(f"workspace {slug!r} not found")
        self.slug = slug


class PromotionNotFoundError(LookupError):
    """The serving alias has had no promotion."""

    def __init__(self, alias: str) -> None:
        super().__init__(f"serving alias {alias!r} has no promotion")


class PromotionConflictError(RuntimeError):
    """A promotion of the alias is under way, or a decision is not due."""


class ModelingConflictError(RuntimeError):
    """A modeling session refused a change in its state: a step out of order, an execution
    not running, a promotion of an unfinished session."""


class SpecRejectedError(ValueError):
    """The submitted spec (an experiment's, a serving spec) is invalid; nothing was started nor
    registered."""

    def __init__(self, issues: Sequence[Issue], what: str = "experiment spec") -> None:
        super().__init__(f"the {what} is invalid ({len(issues)} problems)")
        self.issues = list(issues)


class JobFinishedError(RuntimeError):
    """The job is already terminal; it cannot be canceled."""

    def __init__(self, job_id: str, job_status: str) -> None:
        super().__init__(f"experiment job {job_id} is already {job_status}")
        self.job_id = job_id
        self.status = job_status


class TemporalUnavailableError(RuntimeError):
    """Temporal refused or could not be reached; the message says what failed."""


class PermissionDeniedError(PermissionError):
    """The caller may see the object but lacks the relation the route needs."""

    def __init__(self, subject: str, relation: str, target: str) -> None:
        super().__init__(f"{subject!r} lacks {relation} on {target}")
        self.relation = relation


class QuotaExceededError(RuntimeError):
    """Starting more would exceed a workspace quota; nothing was started."""

    def __init__(self, workspace: str, use: QuotaUse, what: str) -> None:
        super().__init__(
            f"workspace {workspace!r} is at its {use.quota} quota: {what} would exceed the limit "
            f"of {use.limit} (current use {use.current})"
        )
        self.use = use


PROBLEM_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
PROTECTED: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "No valid bearer token; the `WWW-Authenticate` header says why",
        "content": PROBLEM_JSON,
    },
    503: {
        "description": "The token issuer's key set, the authorizer or Temporal could not be "
        "reached",
        "content": PROBLEM_JSON,
    },
}
"""What every protected route may answer besides its own responses, declared as JSON whatever
the route's own media type (an event stream's refusal is a JSON ``Problem`` too)."""


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries declaring a :class:`Problem` body for each status code."""
    return {code: {"model": Problem} for code in codes}


def _issue_of(detail: Any) -> Issue:
    location = [part for part in detail["loc"] if isinstance(part, str | int)]
    if location[:1] == ["body"]:
        location = location[1:]
    field = format_field_path(location) or "body"
    context = detail.get("ctx") or {}
    message = str(context["error"]) if "error" in context else str(detail["msg"])
    return Issue(field=field, message=message)


STATUS_OF: dict[type[Exception], int] = {
    RequestValidationError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    SpecRejectedError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    WorkspaceNotFoundError: status.HTTP_404_NOT_FOUND,
    JobNotFoundError: status.HTTP_404_NOT_FOUND,
    RunNotFoundError: status.HTTP_404_NOT_FOUND,
    JobFinishedError: status.HTTP_409_CONFLICT,
    TemporalUnavailableError: status.HTTP_503_SERVICE_UNAVAILABLE,
    PermissionDeniedError: status.HTTP_403_FORBIDDEN,
    QuotaExceededError: status.HTTP_429_TOO_MANY_REQUESTS,
    WorkspaceExistsError: status.HTTP_409_CONFLICT,
    MemberNotFoundError: status.HTTP_404_NOT_FOUND,
    LastOwnerError: status.HTTP_409_CONFLICT,
    VersionNotFoundError: status.HTTP_404_NOT_FOUND,
    PromotionNotFoundError: status.HTTP_404_NOT_FOUND,
    PromotionConflictError: status.HTTP_409_CONFLICT,
    ModelingConflictError: status.HTTP_409_CONFLICT,
    SessionNotFoundError: status.HTTP_404_NOT_FOUND,
    LiveSessionNotFoundError: status.HTTP_404_NOT_FOUND,
    AliasNotFoundError: status.HTTP_404_NOT_FOUND,
    InvalidRepointError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    LineageError: status.HTTP_409_CONFLICT,
    SpecFileNotFoundError: status.HTTP_404_NOT_FOUND,
    UnservableSnapshotError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    StoreError: status.HTTP_409_CONFLICT,
    AuthenticationError: status.HTTP_401_UNAUTHORIZED,
    KeySetUnavailableError: status.HTTP_503_SERVICE_UNAVAILABLE,
    AuthorizerUnavailableError: status.HTTP_503_SERVICE_UNAVAILABLE,
}
REALM = "qmachina"


def _quoted(text: str) -> str:
    """``text`` as an RFC 6750 quoted value: printable ASCII without ``"`` or ``\\``."""
    plain = text.replace('"', "'").replace("\\", "/")
    return "".join(char if " " <= char <= "~" else "?" for char in plain)


def bearer_challenge(error: AuthenticationError) -> str:
    """The ``WWW-Authenticate`` value for a refused token. A request without any token gets no
    error code (RFC 6750 section 3.1); any other refusal is ``invalid_token``."""
    if isinstance(error, MissingTokenError):
        return f'Bearer realm="{REALM}"'
    return (
        f'Bearer realm="{REALM}", error="invalid_token", error_description="{_quoted(str(error))}"'
    )


async def _answer(request: Request, error: Exception) -> JSONResponse:
    code = next(STATUS_OF[kind] for kind in type(error).__mro__ if kind in STATUS_OF)
    if isinstance(error, RequestValidationError):
        body = Problem(
            detail="invalid request", issues=[_issue_of(detail) for detail in error.errors()]
        )
    elif isinstance(error, SpecRejectedError):
        body = Problem(detail=str(error), issues=error.issues)
    elif isinstance(error, QuotaExceededError):
        body = Problem(detail=str(error), quota=error.use)
    else:
        body = Problem(detail=str(error))
    headers = (
        {"WWW-Authenticate": bearer_challenge(error)}
        if isinstance(error, AuthenticationError)
        else None
    )
    # ``quota`` is sent only on the refusals it explains.
    content = body.model_dump(mode="json", exclude=None if body.quota else {"quota"})
    return JSONResponse(content, status_code=code, headers=headers)


async def _answer_http(request: Request, error: Exception) -> JSONResponse:
    """The framework's own refusals as a :class:`Problem`: a body that cannot be parsed is a
    422 like every other invalid request; the rest (an unknown path, a method the path does not
    serve) keep their status and headers."""
    assert isinstance(error, StarletteHTTPException)
    if error.status_code == status.HTTP_400_BAD_REQUEST:
        body = Problem(detail="invalid request", issues=[Issue(field="body", message=error.detail)])
        return JSONResponse(
            body.model_dump(mode="json", exclude={"quota"}),
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )
    content = Problem(detail=str(error.detail)).model_dump(mode="json", exclude={"quota"})
    return JSONResponse(content, status_code=error.status_code, headers=error.headers)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every domain error, invalid request and framework refusal with a
    :class:`Problem`."""
    for kind in STATUS_OF:
        app.add_exception_handler(kind, _answer)
    app.add_exception_handler(StarletteHTTPException, _answer_http)
