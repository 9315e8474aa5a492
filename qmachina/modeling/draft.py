"""A model drafted in steps: the sections of its spec chain, checked as they are committed.

A modeling session commits one payload per step. Steps 1-4 are *sections* of the spec chain —
``pipeline``, ``gold``, ``serving`` (without its ``pipeline``/``gold`` references) and
``experiment`` (without ``serving``) — which the session links together itself. Steps 5 and 6
carry an :class:`ExecutionCommit` and a :class:`DecisionCommit`.

Two levels of checking:

* :func:`structural_issues` validates one payload against its model. It is pure (no file or
  network I/O, no clock) so a workflow can run it before accepting a commit.
* :func:`check_sections` writes the sections as a configs root (:func:`materialize`) and runs the
  project's own validators on it: the instrument and data files found, signal parameters checked
  against the registry, stream fields emitted, swept parameters known.

Every problem is a :class:`StepIssue`: the step, the dotted path of the field inside the step's
payload (``stream.gold.2.field``) and what is wrong.

This module imports the spec models (and through them the engine): a workflow imports it with
``workflow.unsafe.imports_passed_through()``.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Literal, Self

import yaml
from pydantic import BaseModel, Field, StringConstraints, ValidationError, model_validator

from engine.gold.graph import GoldGraphError
from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.gold import GoldSpec, load_gold_spec
from qmachina.specs.pipeline import PipelineSpec, resolve_pipeline
from qmachina.specs.serving import ServingSpec
from qmachina.specs.spec_model import SpecModel
from qmachina.specs.yaml_loader import YamlDocument, load_yaml_document, validation_issues
from qmachina.validate_configs import validate_experiment, validate_serving

STEP_NAMES: tuple[str, ...] = (
    "dataset",
    "gold",
    "signal",
    "parameter_space",
    "execution",
    "decision",
)
"""Step ``n`` is ``STEP_NAMES[n - 1]``."""
SECTION_OF_STEP: dict[int, str] = {1: "pipeline", 2: "gold", 3: "serving", 4: "experiment"}
STEP_OF_SECTION: dict[str, int] = {section: step for step, section in SECTION_OF_STEP.items()}
SECTIONS: tuple[str, ...] = tuple(SECTION_OF_STEP.values())
"""The sections in chain order: each one may refer to those before it."""
MODEL_FILES: dict[str, str] = {
    "pipeline": "pipelines/model.yaml",
    "gold": "gold/model.yaml",
    "serving": "serving/model.yaml",
    "experiment": "experiments/model.yaml",
}
"""Where each section is written below a materialized configs root."""
FROM_FILE = "from_file"

_SUPPLIED_BY_SESSION: dict[int, tuple[str, ...]] = {3: ("pipeline", "gold"), 4: ("serving",)}
"""References the session injects; a section giving them itself would be overridden silently."""
_PLACEHOLDER_NAME = "model"
"""The experiment name validated when step 4 omits it (the real one is the serving model_id)."""

# The store's own rules (qmachina.store.serving_registry.ALIAS_NAME, FULL_HASH and the reason
# rule), spelt out here so a workflow importing this module does not import the store and
# SQLAlchemy; tests/test_modeling_draft.py proves the patterns equal.
ALIAS_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
POINT_HASH_PATTERN = r"^[0-9a-f]{64}$"
MAX_REASON_CHARS = 2000

AliasName = Annotated[str, StringConstraints(pattern=ALIAS_PATTERN)]
"""Lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, ≤ 64."""
PointHash = Annotated[str, StringConstraints(pattern=POINT_HASH_PATTERN)]
"""A sweep point's full sha256 hex digest."""
Reason = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=MAX_REASON_CHARS,
        pattern=r"^[^\x00]*[^ \t\n\r\x0b\x0c\x00][^\x00]*$",  # something besides blanks; no NUL
    ),
]


@dataclass(frozen=True)
class StepIssue:
    """One problem in one step's payload.

    ``step`` 0 is the manual model document as a whole (e.g. an unknown top-level key).
    ``field`` is the dotted path inside the payload (``eval.tp_ticks.0``), ``""`` for all of it;
    ``line`` is set in manual mode: the line of the manual YAML text.
    """

    step: int
    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        name = STEP_NAMES[self.step - 1] if 1 <= self.step <= len(STEP_NAMES) else "model"
        where = f"line {self.line}: " if self.line is not None else ""
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}step {self.step} ({name}): {what}"


class ModelIssues(ValueError):  # noqa: N818 -- the name the modeling session was written to
    """A draft (or a manual model) is invalid; ``issues`` lists every problem, one per line."""

    def __init__(self, issues: Iterable[StepIssue]) -> None:
        self.issues: list[StepIssue] = list(issues)
        if not self.issues:
            raise ValueError("ModelIssues needs at least one issue")
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __reduce__(self) -> tuple[type[ModelIssues], tuple[list[StepIssue]]]:
        # The default rebuilds from the message string; keep the issues across pickling.
        return (type(self), (self.issues,))


class ExecutionCommit(SpecModel):
    """Step 5: run the sweep the earlier steps define."""

    note: str = ""


class DecisionCommit(SpecModel):
    """Step 6: promote a run of the sweep behind an alias, or abandon the model."""

    decision: Literal["promote", "abandon"]
    point_hash: PointHash | None = None
    """The run to promote; None: the sweep's best run."""
    alias: AliasName | None = None
    reason: Reason
    thresholds: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict
    )
    """Least value of each metric path of the run (``test.hit_rate``), as promotion checks."""
    require_approval: bool = False

    @model_validator(mode="after")
    def _alias_to_promote(self) -> Self:
        if self.decision == "promote" and self.alias is None:
            raise ValueError("a promotion names the alias to put the run behind")
        return self


_STEP_MODELS: dict[int, type[BaseModel]] = {
    1: PipelineSpec,
    2: GoldSpec,
    3: ServingSpec,
    4: ExperimentSpec,
    5: ExecutionCommit,
    6: DecisionCommit,
}


def expand_from_file(
    step: int, payload: Mapping[str, object], configs_root: Path
) -> dict[str, object]:
    """A ``{"from_file": path}`` payload (steps 1-4; path relative to the configs root) becomes
    that file's data, less the references the session supplies (step 3: ``pipeline`` and
    ``gold``; step 4: ``serving``). Any other payload comes back as a copy. Raises
    :class:`ModelIssues` at field ``from_file`` when the reference cannot be used."""
    if FROM_FILE not in payload:
        return copy.deepcopy(dict(payload))

    def refused(message: str) -> ModelIssues:
        return ModelIssues([StepIssue(step, FROM_FILE, message)])

    if step not in SECTION_OF_STEP:
        raise refused("only steps 1-4 (spec sections) may be given from a file")
    others = sorted(str(key) for key in payload if key != FROM_FILE)
    if others:
        raise refused(f"give from_file alone; also given: {', '.join(others)}")
    reference = payload[FROM_FILE]
    if not isinstance(reference, str) or not reference:
        raise refused("expected a path relative to the configs root, e.g. 'gold/vp_default.yaml'")
    if PurePath(reference).is_absolute():
        raise refused(f"{reference!r} must be relative to the configs root")
    root = configs_root.resolve()
    file = (root / reference).resolve()
    if not file.is_relative_to(root):
        raise refused(f"{reference!r} is outside the configs root")
    if not file.is_file():
        raise refused(f"{reference} not found under {configs_root}")
    try:
        data = load_yaml_document(file).data
    except SpecError as exc:
        raise ModelIssues(StepIssue(step, FROM_FILE, str(issue)) for issue in exc.issues) from None
    if not isinstance(data, dict):
        raise refused(f"{reference} holds a {type(data).__name__}, not a mapping of fields")
    section = {key: value for key, value in data.items() if key not in _supplied(step)}
    return copy.deepcopy(section)


def structural_issues(step: int, payload: Mapping[str, object]) -> list[StepIssue]:
    """Every problem of one step's payload against the step's model; [] when it is valid.

    Pure: no I/O and no clock, so a workflow may call it. Step 3 is validated with placeholder
    ``pipeline``/``gold`` references, step 4 with a placeholder ``serving`` (and ``name`` when
    omitted); a payload giving those references itself is an issue.
    """
    model = _STEP_MODELS.get(step)
    if model is None:
        known = ", ".join(f"{n} ({name})" for n, name in enumerate(STEP_NAMES, start=1))
        return [StepIssue(step, "", f"no step {step}; the steps are {known}")]
    issues: list[StepIssue] = []
    data: object = payload
    if isinstance(payload, Mapping):
        issues += [
            StepIssue(step, key, f"{key!r} is supplied by the session; remove it")
            for key in _supplied(step)
            if key in payload
        ]
        data = _with_placeholders(step, payload)
    try:
        model.model_validate(data)
    except ValidationError as exc:
        issues += _validation_step_issues(step, exc, model)
    return issues


def check_sections(
    sections: Mapping[str, Mapping[str, object]], *, configs_root: Path, data_root: Path
) -> list[StepIssue]:
    """Deep-check the sections given (a prefix of pipeline, gold, serving, experiment) with the
    project's validators, on a configs root they are materialized into; [] when all pass.

    Issues in a section's own file are located at the field path inside the section; an issue
    in another file (a shipped instrument config) names that file in its message and is given
    to the step whose check met it.
    """
    _assert_prefix(sections)
    with tempfile.TemporaryDirectory(prefix="qmachina-draft-") as temporary:
        into = materialize(sections, configs_root=configs_root, into=Path(temporary))
        checks: dict[str, Callable[[Path], object]] = {
            "pipeline": lambda path: resolve_pipeline(path, into, data_root),
            "gold": load_gold_spec,
            "serving": lambda path: validate_serving(path, root=into, data_root=data_root),
            "experiment": lambda path: validate_experiment(path, root=into, data_root=data_root),
        }
        found: list[StepIssue] = []
        for section in SECTIONS:
            if section not in sections:
                break
            try:
                checks[section](into / MODEL_FILES[section])
            except SpecError as exc:
                step = STEP_OF_SECTION[section]
                found += [_step_issue(issue, step, into, configs_root) for issue in exc.issues]
    # A later check re-validates the files before it (serving resolves the pipeline again).
    return list(dict.fromkeys(found))


def materialize(
    sections: Mapping[str, Mapping[str, object]], *, configs_root: Path, into: Path
) -> Path:
    """Write a self-contained configs root at ``into``: the shipped configs, then each section
    given at its :data:`MODEL_FILES` path with the chain's references injected. The same
    sections always give the same bytes; a model file of a section not given is removed.
    Returns ``into``."""
    _assert_prefix(sections)
    if into.resolve().is_relative_to(configs_root.resolve()):
        raise ValueError(f"cannot materialize into {into}: it is inside the configs root")
    reserved = {PurePath(relative) for relative in MODEL_FILES.values()}

    def skip_reserved(directory: str, names: list[str]) -> set[str]:
        # A shipped file at a model file's path would outlive a draft without that section.
        below = Path(directory).relative_to(configs_root)
        return {name for name in names if below / name in reserved}

    into.mkdir(parents=True, exist_ok=True)
    shutil.copytree(configs_root, into, ignore=skip_reserved, dirs_exist_ok=True)
    for section, relative in MODEL_FILES.items():
        file = into / relative
        if section not in sections:
            file.unlink(missing_ok=True)
            continue
        file.parent.mkdir(parents=True, exist_ok=True)
        content = _plain(_linked(section, sections))
        file.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return into


def _supplied(step: int) -> tuple[str, ...]:
    return _SUPPLIED_BY_SESSION.get(step, ())


def _with_placeholders(step: int, payload: Mapping[str, object]) -> dict[str, object]:
    data = dict(payload)
    if step == 3:
        data["pipeline"] = MODEL_FILES["pipeline"]
        data["gold"] = MODEL_FILES["gold"]
    elif step == 4:
        data["serving"] = MODEL_FILES["serving"]
        data.setdefault("name", _PLACEHOLDER_NAME)
    return data


def _validation_step_issues(
    step: int, error: ValidationError, model: type[BaseModel]
) -> list[StepIssue]:
    graph_errors = [
        graph_error
        for detail in error.errors()
        if isinstance(graph_error := (detail.get("ctx") or {}).get("error"), GoldGraphError)
    ]
    if graph_errors:  # the graph is only checked once every node is valid: nothing else failed
        return [
            StepIssue(step, _dotted_path(issue.path), issue.message)
            for graph_error in graph_errors
            for issue in graph_error.issues
        ]
    # The loader's messages are the project's best (close-match hints on unknown fields); an
    # unlocated document gives them without lines.
    unlocated = YamlDocument(file="", data=None, lines={})
    return [
        StepIssue(step, _dotted_field(issue.field), issue.message)
        for issue in validation_issues(error, unlocated, model)
    ]


def _step_issue(issue: SpecIssue, step: int, into: Path, configs_root: Path) -> StepIssue:
    """A validator's issue as a step's: by the model file it is in, else named with its file."""
    message = _unmaterialized(issue.message, into, configs_root)
    file = Path(issue.file)
    for section, relative in MODEL_FILES.items():
        if file == into / relative:
            return StepIssue(STEP_OF_SECTION[section], _dotted_field(issue.field), message)
    named = SpecIssue(
        _unmaterialized(issue.file, into, configs_root), issue.line, issue.field, message
    )
    return StepIssue(step, "", str(named))


def _unmaterialized(text: str, into: Path, configs_root: Path) -> str:
    """Paths below the temporary root named as the shipped files they are copies of."""
    for prefix in dict.fromkeys((str(into.resolve()), str(into))):
        text = text.replace(prefix, str(configs_root))
    return text


def _linked(section: str, sections: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """A section as its model file holds it: the chain's references injected."""
    data = dict(sections[section])
    if section == "serving":
        head = {key: data.pop(key) for key in ("model_id",) if key in data}
        return {
            **head,
            "pipeline": MODEL_FILES["pipeline"],
            "gold": MODEL_FILES["gold"],
            **_without(data, "pipeline", "gold"),
        }
    if section == "experiment":
        name = data.pop("name", sections["serving"].get("model_id"))
        head = {} if name is None else {"name": name}
        return {**head, "serving": MODEL_FILES["serving"], **_without(data, "serving")}
    return data


def _without(data: Mapping[str, object], *keys: str) -> dict[str, object]:
    return {key: value for key, value in data.items() if key not in keys}


def _plain(value: object) -> object:
    """JSON-like data as the safe dumper writes it (tuples become lists)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _assert_prefix(sections: Mapping[str, object]) -> None:
    expected = SECTIONS[: len(sections)]
    assert set(sections) == set(expected), (
        f"sections {sorted(sections)} are not a prefix of the chain {SECTIONS}; "
        "a section is checked only with every section before it"
    )


_FIELD_INDEX = re.compile(r"\[(\d+)\]")


def _dotted_field(field: str) -> str:
    """The loader's ``stream.gold[2].field`` as ``stream.gold.2.field``."""
    return _FIELD_INDEX.sub(r".\1", field).lstrip(".")


def _dotted_path(path: Sequence[str | int]) -> str:
    return ".".join(str(part) for part in path)
