"""Serving snapshots: exactly what a serving version runs, and where it came from.

A :class:`ServingSnapshot` is built from a serving spec (or from an experiment run: the job's
serving spec with the run's signal parameters and threshold) only after the spec passes the
checks ``qmachina config validate`` runs, with every reference resolved and loaded: the pipeline
spec with its effective instrument config and hash, the gold spec with its hash, the signal with
every parameter typed and defaulted, scoring, stream schema and display hints. Its
:class:`Lineage` names the dataset files with their sha256 and size, the experiment job, spec and
run it came from (if any), the spec file it was read from and the code that registered it.

Identity. ``version_id`` is the sha256 of the canonical JSON of the content and of the lineage
*without* ``spec_file`` and ``code_version``: what runs and the evidence it rests on (data
checksums, the experiment run) make the version; where the spec file sat and which commit of
qMachina happened to register it do not. So registering the same content twice, from another
checkout or after an unrelated commit, gives the same version; the stored snapshot keeps the
first registration's ``spec_file`` and ``code_version``. A version is immutable, so a new
engine release that changes what a snapshot computes must be registered as new content (a
changed spec or parameter), not discovered through a commit hash.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from engine.signals.builtin import load_builtin_signals
from engine.signals.registry import SignalError, validate_params
from engine.sweep_core import SweepPoint
from qmachina.specs.errors import SpecError
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.gold import GoldSpec, load_gold_spec
from qmachina.specs.identity import spec_hash
from qmachina.specs.instrument import InstrumentConfig
from qmachina.specs.pipeline import PipelineSpec, ResolvedPipeline, resolve_pipeline
from qmachina.specs.serving import (
    SIGNAL_SCORE_FIELD,
    ModelId,
    Scoring,
    ServingSpec,
    SignalChoice,
    StreamSchema,
    Visualization,
)
from qmachina.specs.spec_model import SpecModel
from qmachina.validate_configs import SILVER_WIRE_FIELDS, validate_serving

_REPO_ROOT = Path(__file__).resolve().parents[2]
_DIGEST_CHUNK_BYTES = 1 << 20

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Source = Literal["serving_spec", "experiment_run"]


class LineageError(ValueError):
    """An experiment run cannot become a serving version as it stands (its specs changed since
    it ran, it failed, or its parameters are not a sweep point); the message says why."""


class SpecFileNotFoundError(LookupError):
    """The serving spec to register is not a file under the configs root."""

    def __init__(self, spec_file: str, configs_root: Path) -> None:
        super().__init__(
            f"serving spec {spec_file!r} not found under the configs root {configs_root}"
        )
        self.spec_file = spec_file


class UnservableSnapshotError(ValueError):
    """A snapshot whose content could not run: parameters the signal registry refuses, stream
    fields the model does not emit, or an id that is not the hash of its content."""


class PipelineSnapshot(SpecModel):
    """The pipeline as resolved: its spec, the instrument with its overrides applied, its hash."""

    spec: PipelineSpec
    instrument: InstrumentConfig
    pipeline_hash: Sha256Hex


class GoldSnapshot(SpecModel):
    """The gold DSL spec and its canonical hash."""

    spec: GoldSpec
    spec_hash: Sha256Hex

    @model_validator(mode="after")
    def _hash_of_spec(self) -> Self:
        if spec_hash(self.spec) != self.spec_hash:
            raise ValueError(f"gold spec_hash {self.spec_hash} is not the hash of the gold spec")
        return self


class ServingContent(SpecModel):
    """What a serving version runs: every reference of its serving spec resolved."""

    model_id: ModelId
    pipeline: PipelineSnapshot
    gold: GoldSnapshot
    signal: SignalChoice
    """The signal with every parameter, defaults filled in (as a sweep point holds them)."""
    scoring: Scoring
    projection_horizons_bins: tuple[Annotated[int, Field(gt=0)], ...] = Field(strict=False)
    stream: StreamSchema
    visualization: Visualization


class DatasetFile(SpecModel):
    """A dataset file as it was when the version was registered."""

    name: str = Field(description="As the pipeline names it, relative to the data root")
    sha256: Sha256Hex
    size_bytes: Annotated[int, Field(ge=0)]


class RunPoint(SpecModel):
    """The sweep point of an experiment run, beyond the signal and threshold the content holds:
    the dataset and trade geometry it was evaluated with."""

    dataset: str
    threshold: float
    tp_ticks: int
    sl_ticks: int
    cooldown_bins: int
    max_hold_bins: int
    warmup_bins: int


class Provenance(SpecModel):
    """The part of the lineage that enters the version id: the data and experiment evidence."""

    source: Source
    serving_spec_hash: Sha256Hex
    """The serving spec as its file reads (before a run's parameters are applied)."""
    dataset_pipeline_hash: Sha256Hex
    """The pipeline whose data the version was evaluated on (for a spec: its own)."""
    dataset_files: tuple[DatasetFile, ...] = Field(strict=False)
    experiment_job_id: str | None = None
    experiment_spec_hash: Sha256Hex | None = None
    run_point_hash: Sha256Hex | None = None
    run_point: RunPoint | None = None


class CodeVersion(SpecModel):
    """The qMachina that registered the version."""

    package: str
    git_commit: str | None


class Lineage(Provenance):
    """Where a version came from. ``spec_file`` and ``code_version`` describe the registration
    and stay out of the version id (see the module's docstring)."""

    spec_file: str
    """The serving spec file, relative to the configs root."""
    code_version: CodeVersion
    modeling_session_id: str | None = None
    """The Create-a-Model session that produced the version, if one did."""


class VersionIdentity(SpecModel):
    """What ``version_id`` hashes."""

    content: ServingContent
    provenance: Provenance


def version_id_of(content: ServingContent, lineage: Provenance) -> str:
    """sha256 of the canonical JSON of the content and the lineage's provenance."""
    provenance = Provenance(**{name: getattr(lineage, name) for name in Provenance.model_fields})
    return spec_hash(VersionIdentity(content=content, provenance=provenance))


class ServingSnapshot(SpecModel):
    """An immutable runtime snapshot, addressed by the hash of its content."""

    version_id: Sha256Hex
    content: ServingContent
    lineage: Lineage

    @model_validator(mode="after")
    def _addressed_by_content(self) -> Self:
        expected = version_id_of(self.content, self.lineage)
        if self.version_id != expected:
            raise ValueError(
                f"version_id {self.version_id} is not the hash of the snapshot's content "
                f"({expected})"
            )
        return self

    @classmethod
    def of(cls, content: ServingContent, lineage: Lineage) -> ServingSnapshot:
        """The snapshot of ``content`` and ``lineage``, its id computed."""
        return cls(version_id=version_id_of(content, lineage), content=content, lineage=lineage)

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> ServingSnapshot:
        """A snapshot read back from its JSON form (as the store keeps it), its id checked."""
        return cls.model_validate_json(json.dumps(dict(data), allow_nan=False))

    def stored(self) -> dict[str, Any]:
        """The JSON form kept by the store."""
        stored: dict[str, Any] = self.model_dump(mode="json")
        return stored


def check_servable(snapshot: ServingSnapshot) -> None:
    """Refuse a snapshot whose content could not serve, however it was built: the signal
    registry must accept its parameters exactly as given (every one typed, defaults filled), and
    its stream must carry only what the model emits, each on its own wire."""
    content = snapshot.content
    problems: list[str] = []
    load_builtin_signals()
    try:
        expected = validate_params(content.signal.name, content.signal.params)
    except SignalError as error:
        problems.append(f"signal: {error}")
    else:
        if expected != content.signal.params:
            problems.append(
                f"signal.params: {content.signal.params} are not the signal's full, typed "
                f"parameters {expected}"
            )
    gold_outputs = set(content.gold.spec.outputs)
    for entry in content.stream.silver:
        if entry.field in gold_outputs or entry.field == SIGNAL_SCORE_FIELD:
            problems.append(f"stream.silver: {entry.field!r} is a gold output")
        elif entry.field not in SILVER_WIRE_FIELDS:
            problems.append(f"stream.silver: silver does not emit {entry.field!r}")
    for entry in content.stream.gold:
        if entry.field not in gold_outputs and entry.field != SIGNAL_SCORE_FIELD:
            problems.append(f"stream.gold: the model does not emit {entry.field!r}")
    if problems:
        raise UnservableSnapshotError(
            f"serving snapshot {snapshot.version_id} cannot serve: {'; '.join(problems)}"
        )


@dataclass(frozen=True)
class RunSource:
    """An experiment run as recorded: its job, the job's experiment spec hash, its point hash,
    the point's parameters and the spec hashes it was evaluated with."""

    job_id: str
    experiment_spec_hash: str
    point_hash: str
    params: Mapping[str, Any]
    spec_hashes: Mapping[str, Any]
    status: str


def snapshot_from_spec(spec_file: str, *, configs_root: Path, data_root: Path) -> ServingSnapshot:
    """The snapshot of the serving spec at ``spec_file`` (relative to ``configs_root``).

    Raises :class:`SpecFileNotFoundError` when there is no such file under the root, and
    :class:`SpecError` naming the file, line and field of every problem; nothing is built from
    a spec the config validator refuses.
    """
    try:
        path = _inside(spec_file, configs_root)
        found = path.is_file()
    except (SpecError, OSError):  # outside the root, a NUL, a name too long for the system
        found = False
    if not found:
        raise SpecFileNotFoundError(spec_file, configs_root)
    spec = validate_serving(path, root=configs_root, data_root=data_root)
    pipeline = resolve_pipeline(configs_root / spec.pipeline, configs_root, data_root)
    provenance: dict[str, Any] = {
        "source": "serving_spec",
        "serving_spec_hash": spec_hash(spec),
        "dataset_pipeline_hash": pipeline.pipeline_hash,
        "dataset_files": dataset_files(pipeline),
    }
    return _snapshot(spec, pipeline, configs_root, spec_file, provenance)


def snapshot_from_run(
    run: RunSource, experiment: ExperimentSpec, *, configs_root: Path, data_root: Path
) -> ServingSnapshot:
    """The snapshot of an experiment run: the experiment's serving spec with the run's signal
    parameters and threshold, checked like any serving spec, its lineage naming the job, the
    experiment spec and the run's point.

    Raises :class:`SpecError` when the spec (or the run's values in it) fails validation, and
    :class:`LineageError` when the run cannot stand for what would serve: it failed, its
    parameters are not the sweep point its hash names, or the serving or gold spec changed
    since it ran, or it was evaluated on data with other instrument or engine settings.
    """
    if run.status != "succeeded":
        raise LineageError(
            f"experiment run {run.point_hash} of job {run.job_id} {run.status}; only a "
            "succeeded run can be registered"
        )
    point = _sweep_point(run)
    path = _inside(experiment.serving, configs_root)
    recorded = validate_serving(path, root=configs_root, data_root=data_root)
    if point.signal != recorded.signal.name:
        raise LineageError(
            f"experiment run {run.point_hash} evaluated signal {point.signal!r}; "
            f"{experiment.serving} now names {recorded.signal.name!r}"
        )
    gold_hash = spec_hash(load_gold_spec(configs_root / recorded.gold))
    for name, now in (("serving", spec_hash(recorded)), ("gold", gold_hash)):
        then = run.spec_hashes.get(name)
        if then != now:
            raise LineageError(
                f"the {name} spec of experiment job {run.job_id} changed since run "
                f"{run.point_hash} was evaluated (hash {then}, now {now}); register from a run "
                "of the spec as it stands"
            )
    spec = validate_serving(
        path,
        root=configs_root,
        data_root=data_root,
        overrides={
            "signal": {"name": point.signal, "params": dict(point.signal_params)},
            "scoring": {**recorded.scoring.model_dump(), "threshold": point.threshold},
        },
    )
    pipeline = resolve_pipeline(configs_root / spec.pipeline, configs_root, data_root)
    evaluated = resolve_pipeline(_inside(point.dataset, configs_root), configs_root, data_root)
    if evaluated.instrument != pipeline.instrument:
        raise LineageError(
            f"experiment run {run.point_hash} was evaluated on {point.dataset}, whose instrument "
            f"or engine settings differ from those of {spec.pipeline}, which would serve"
        )
    provenance: dict[str, Any] = {
        "source": "experiment_run",
        "serving_spec_hash": spec_hash(recorded),
        "dataset_pipeline_hash": evaluated.pipeline_hash,
        "dataset_files": dataset_files(evaluated),
        "experiment_job_id": run.job_id,
        "experiment_spec_hash": run.experiment_spec_hash,
        "run_point_hash": run.point_hash,
        "run_point": RunPoint(
            dataset=point.dataset,
            threshold=point.threshold,
            tp_ticks=point.tp_ticks,
            sl_ticks=point.sl_ticks,
            cooldown_bins=point.cooldown_bins,
            max_hold_bins=point.max_hold_bins,
            warmup_bins=point.warmup_bins,
        ),
    }
    return _snapshot(spec, pipeline, configs_root, experiment.serving, provenance)


def _snapshot(
    spec: ServingSpec,
    pipeline: ResolvedPipeline,
    configs_root: Path,
    spec_file: str,
    provenance: dict[str, Any],
) -> ServingSnapshot:
    gold = load_gold_spec(configs_root / spec.gold)
    content = ServingContent(
        model_id=spec.model_id,
        pipeline=PipelineSnapshot(
            spec=pipeline.spec, instrument=pipeline.instrument, pipeline_hash=pipeline.pipeline_hash
        ),
        gold=GoldSnapshot(spec=gold, spec_hash=spec_hash(gold)),
        signal=SignalChoice(
            name=spec.signal.name, params=validate_params(spec.signal.name, spec.signal.params)
        ),
        scoring=spec.scoring,
        projection_horizons_bins=spec.projection_horizons_bins,
        stream=spec.stream,
        visualization=spec.visualization,
    )
    lineage = Lineage(**provenance, spec_file=spec_file, code_version=code_version())
    snapshot = ServingSnapshot.of(content, lineage)
    check_servable(snapshot)
    return snapshot


def _inside(relative: str, configs_root: Path) -> Path:
    """``relative`` under the configs root, refusing absolute paths and ``..``."""
    path = configs_root / relative
    try:
        inside = (
            not Path(relative).is_absolute()
            and ".." not in Path(relative).parts
            and path.resolve().is_relative_to(configs_root.resolve())
        )
    except (OSError, ValueError) as error:  # a NUL, an unencodable name, a symlink loop
        raise SpecError.single(repr(relative), None, "", f"not a usable path ({error})") from None
    if not inside:
        raise SpecError.single(
            relative, None, "", f"not a path inside the configs root {configs_root}"
        )
    return path


def _sweep_point(run: RunSource) -> SweepPoint:
    """The run's sweep point, proved to be the one its hash names."""
    params = run.params
    try:
        signal_params = params["signal_params"]
        if not isinstance(signal_params, Mapping):
            raise TypeError("signal_params is not a mapping")
        point = SweepPoint(
            dataset=str(params["dataset"]),
            signal=str(params["signal"]),
            signal_params=tuple(sorted(signal_params.items())),
            threshold=float(params["threshold"]),
            tp_ticks=int(params["tp_ticks"]),
            sl_ticks=int(params["sl_ticks"]),
            cooldown_bins=int(params["cooldown_bins"]),
            max_hold_bins=int(params["max_hold_bins"]),
            warmup_bins=int(params["warmup_bins"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise LineageError(
            f"experiment run {run.point_hash} does not hold a sweep point's parameters ({error})"
        ) from None
    if point.point_hash != run.point_hash:
        raise LineageError(
            f"experiment run {run.point_hash}: its parameters hash to {point.point_hash}"
        )
    return point


def dataset_files(pipeline: ResolvedPipeline) -> tuple[DatasetFile, ...]:
    """The pipeline's dataset files with their sha256 and size, as named in its identity."""
    files = []
    for name, path in zip(
        pipeline.identity.capture.dataset_files, pipeline.dataset_paths, strict=True
    ):
        stat = path.stat()
        files.append(
            DatasetFile(
                name=name,
                sha256=_file_sha256(str(path), stat.st_size, stat.st_mtime_ns),
                size_bytes=stat.st_size,
            )
        )
    return tuple(files)


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256; remembered while its size and modification time stay the same (dataset
    files are large and are registered again and again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def code_version() -> CodeVersion:
    """This process's qMachina: the installed package version and, in a git checkout, the
    commit it runs."""
    try:
        package = importlib.metadata.version("qmachina")
    except importlib.metadata.PackageNotFoundError:
        package = "unknown"
    return CodeVersion(package=package, git_commit=_git_commit())


def _git_commit() -> str | None:
    try:
        found = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = found.stdout.strip()
    return commit if found.returncode == 0 and commit else None
