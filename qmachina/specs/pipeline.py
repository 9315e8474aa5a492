"""Pipeline specs (``configs/pipelines/*.yaml``) and their resolution against the disk.

A PipelineSpec names an instrument config (a path relative to the configs root), the
capture (which DBN files, which instrument, which local session window) and engine
overrides. ``resolve_pipeline`` loads the instrument, applies the overrides, finds the
files under a data root given at call time, and hashes the resolved content.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path, PurePath
from typing import Annotated, Self
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.replay import in_zone, utc_ns
from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.specs.identity import spec_hash
from qmachina.specs.instrument import (
    EngineOverrides,
    EngineSettings,
    InstrumentConfig,
    InstrumentId,
    Token,
    load_instrument_config,
)
from qmachina.specs.spec_model import SpecModel
from qmachina.specs.yaml_loader import (
    YamlDocument,
    load_yaml_document,
    validate_document,
    validation_issues,
)

_REPO_ROOT = Path(__file__).resolve().parents[2]

PipelineName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
LocalDatetime = Annotated[datetime, Field(strict=False)]
"""A wall-clock time without offset, e.g. ``2023-12-25T17:00``."""


def default_configs_root() -> Path:
    """The ``configs/`` directory that ships with qMachina."""
    return _REPO_ROOT / "configs"


def default_data_root() -> Path:
    """The Databento files next to the checkout: ``../shared/data/databento``."""
    return _REPO_ROOT.parent / "shared" / "data" / "databento"


class SessionWindow(SpecModel):
    """A replay window in the instrument's local time; ``end`` is exclusive."""

    start: LocalDatetime
    end: LocalDatetime

    @field_validator("start", "end")
    @classmethod
    def _local_time(cls, moment: datetime) -> datetime:
        if moment.tzinfo is not None:
            raise ValueError(
                "give a local time without offset (e.g. 2023-12-25T17:00); "
                "it is read in the instrument's timezone"
            )
        return moment

    @model_validator(mode="after")
    def _ends_after_start(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"session end {self.end} must be after start {self.start}")
        return self


class CaptureSpec(SpecModel):
    """Which recorded data a pipeline replays."""

    dataset_files: Annotated[
        tuple[Annotated[str, StringConstraints(min_length=1)], ...],
        Field(strict=False, min_length=1),
    ]
    instrument_id: InstrumentId | None = None
    raw_symbol: Token | None = None
    session: SessionWindow | None = None

    @field_validator("dataset_files")
    @classmethod
    def _each_file_once(cls, files: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({name for name in files if files.count(name) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return files

    @model_validator(mode="after")
    def _one_instrument_selector(self) -> Self:
        if (self.instrument_id is None) == (self.raw_symbol is None):
            raise ValueError("give exactly one of instrument_id or raw_symbol")
        return self


class PipelineSpec(SpecModel):
    """A named replay: instrument config reference, capture, engine overrides."""

    name: PipelineName
    instrument: Annotated[str, StringConstraints(min_length=1)]
    capture: CaptureSpec
    engine: EngineOverrides = EngineOverrides()

    @field_validator("instrument")
    @classmethod
    def _relative_reference(cls, reference: str) -> str:
        if PurePath(reference).is_absolute():
            raise ValueError(
                f"{reference!r} must be relative to the configs root, e.g. 'instruments/es.yaml'"
            )
        return reference


class PipelineIdentity(SpecModel):
    """What a pipeline computes, and nothing about where it runs; its hash keys the lake.

    The pipeline's name and the instrument file's location are labels, not content, so
    they are left out; dataset files appear as written (relative to the data root), and an
    absolute path by its file name only.
    """

    instrument: InstrumentConfig
    capture: CaptureSpec


class ResolvedSession(BaseModel):
    """A session window placed on the timeline: aware datetimes in the instrument's zone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: datetime
    end: datetime

    @property
    def start_ns(self) -> int:
        """Start as nanoseconds since the Unix epoch (UTC), like DBN timestamps."""
        return utc_ns(self.start)

    @property
    def end_ns(self) -> int:
        """End (exclusive) as nanoseconds since the Unix epoch (UTC)."""
        return utc_ns(self.end)


class ResolvedPipeline(BaseModel):
    """A pipeline with everything it refers to loaded, checked and hashed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: PipelineSpec
    spec_file: Path
    instrument_file: Path
    instrument: InstrumentConfig
    """The instrument with the pipeline's engine overrides applied."""
    engine: EngineSettings
    """The effective engine settings (the same values as in ``instrument``)."""
    dataset_paths: tuple[Path, ...]
    session: ResolvedSession | None
    identity: PipelineIdentity
    pipeline_hash: str


def load_pipeline_spec(path: str | Path) -> PipelineSpec:
    """Load and validate one pipeline spec YAML file, without resolving its references."""
    return validate_document(load_yaml_document(path), PipelineSpec)


def resolve_pipeline(
    path: str | Path,
    configs_root: str | Path | None = None,
    data_root: str | Path | None = None,
    *,
    check_files: bool = True,
) -> ResolvedPipeline:
    """Load a pipeline spec, its instrument and overrides, locate its files, and hash it.

    Relative dataset files resolve against ``data_root`` (default: ``default_data_root()``);
    the instrument reference against ``configs_root`` (default: ``default_configs_root()``).
    With ``check_files`` every dataset file must exist. Every problem is a ``SpecError``
    naming the file and line that caused it.
    """
    configs = Path(configs_root) if configs_root is not None else default_configs_root()
    data = Path(data_root) if data_root is not None else default_data_root()
    document = load_yaml_document(path)
    spec = validate_document(document, PipelineSpec)

    instrument_file = configs / spec.instrument
    base_instrument = _load_referenced_instrument(document, instrument_file)
    try:
        instrument = base_instrument.with_engine_overrides(spec.engine)
    except ValidationError as exc:
        raise SpecError(
            validation_issues(exc, document, InstrumentConfig, prefix=("engine",))
        ) from None

    dataset_paths = tuple((data / name).absolute() for name in spec.capture.dataset_files)
    issues: list[SpecIssue] = []
    if check_files:
        issues += [
            document.issue(("capture", "dataset_files", index), f"dataset file {file} not found")
            for index, file in enumerate(dataset_paths)
            if not file.is_file()
        ]
    if (
        spec.capture.instrument_id is not None
        and instrument.instrument_id is not None
        and spec.capture.instrument_id != instrument.instrument_id
    ):
        issues.append(
            document.issue(
                ("capture", "instrument_id"),
                f"{spec.capture.instrument_id} differs from instrument_id "
                f"{instrument.instrument_id} in {instrument_file}",
            )
        )
    session = None
    if spec.capture.session is not None:
        session, session_issues = _place_session(document, spec.capture.session, instrument.zone)
        issues += session_issues
    if issues:
        raise SpecError(sorted(issues, key=lambda issue: issue.line or 0))

    identity = PipelineIdentity(
        instrument=instrument,
        capture=spec.capture.model_copy(
            update={"dataset_files": tuple(map(_portable_name, spec.capture.dataset_files))}
        ),
    )
    return ResolvedPipeline(
        spec=spec,
        spec_file=Path(path),
        instrument_file=instrument_file,
        instrument=instrument,
        engine=instrument.engine_settings(),
        dataset_paths=dataset_paths,
        session=session,
        identity=identity,
        pipeline_hash=spec_hash(identity),
    )


def with_dataset_files(pipeline: ResolvedPipeline, files: Sequence[Path]) -> ResolvedPipeline:
    """The same pipeline over other input files (e.g. ``--input`` on the command line); the
    files enter the identity, and so the hash, by name."""
    if not files:
        raise ValueError("no input files given")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise SpecError(
            [
                SpecIssue(file=name, line=None, field="", message="input file not found")
                for name in missing
            ]
        )
    capture = pipeline.identity.capture.model_copy(
        update={"dataset_files": tuple(Path(f).name for f in files)}
    )
    identity = pipeline.identity.model_copy(update={"capture": capture})
    return pipeline.model_copy(
        update={
            "dataset_paths": tuple(Path(f).absolute() for f in files),
            "identity": identity,
            "pipeline_hash": spec_hash(identity),
        }
    )


def _load_referenced_instrument(document: YamlDocument, file: Path) -> InstrumentConfig:
    """The instrument config, with errors pointing at both files."""
    if not file.is_file():
        raise SpecError([document.issue(("instrument",), f"instrument config {file} not found")])
    try:
        return load_instrument_config(file)
    except SpecError as exc:
        referenced_here = document.issue(
            ("instrument",), f"instrument config {file} is invalid (see above)"
        )
        raise SpecError([*exc.issues, referenced_here]) from None


def _place_session(
    document: YamlDocument, window: SessionWindow, zone: ZoneInfo
) -> tuple[ResolvedSession | None, list[SpecIssue]]:
    issues: list[SpecIssue] = []
    placed: dict[str, datetime] = {}
    for edge in ("start", "end"):
        local: datetime = getattr(window, edge)
        try:
            placed[edge] = in_zone(local, zone)
        except ValueError as exc:
            issues.append(document.issue(("capture", "session", edge), str(exc)))
    if issues:
        return None, issues
    return ResolvedSession(start=placed["start"], end=placed["end"]), []


def _portable_name(dataset_file: str) -> str:
    """A dataset file as it enters the hash: relative as written, absolute by name only."""
    path = PurePath(dataset_file)
    return path.name if path.is_absolute() else path.as_posix()
