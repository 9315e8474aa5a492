"""Validate every spec under a configs root, cross-references included.

The kind of a file is the folder it sits in below the root: ``instruments/``, ``pipelines/``,
``gold/``, ``serving/`` or ``experiments/``. Run as ``qmachina config validate`` or
``python -m qmachina.validate_configs``; the exit status is 1 when any file is invalid.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.signals.builtin import load_builtin_signals
from engine.signals.registry import Signal, SignalError, get_signal, validate_params
from engine.silver import BIN_FIELDS, TICK_COLUMNS
from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.gold import load_gold_spec
from qmachina.specs.instrument import load_instrument_config
from qmachina.specs.pipeline import default_configs_root, default_data_root, resolve_pipeline
from qmachina.specs.serving import SIGNAL_SCORE_FIELD, ServingSpec
from qmachina.specs.yaml_loader import YamlDocument, load_yaml_document, validate_document

KINDS = ("instruments", "pipelines", "gold", "serving", "experiments")
SILVER_WIRE_FIELDS = frozenset([name for name, _ in TICK_COLUMNS] + [f.name for f in BIN_FIELDS])


@dataclass
class ValidationReport:
    """What was checked and every problem found, each naming its file and line."""

    checked: list[Path] = field(default_factory=list)
    issues: list[SpecIssue] = field(default_factory=list)
    deprecations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues


class _Validator:
    def __init__(self, root: Path, data_root: Path) -> None:
        self.root = root
        self.data_root = data_root
        load_builtin_signals()

    def kind_of(self, path: Path) -> str | None:
        try:
            relative = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        return relative.parts[0] if len(relative.parts) > 1 else None

    def check(self, path: Path) -> None:
        kind = self.kind_of(path)
        checks: dict[str, Callable[[Path], object]] = {
            "instruments": load_instrument_config,
            "pipelines": lambda p: resolve_pipeline(p, self.root, self.data_root),
            "gold": load_gold_spec,
            "serving": self.serving,
            "experiments": self.experiment,
        }
        if kind not in checks:
            raise SpecError.single(
                str(path), None, "", f"not under one of {', '.join(KINDS)} in {self.root}"
            )
        checks[kind](path)

    def referenced(self, document: YamlDocument, where: tuple[str | int, ...], ref: str) -> Path:
        path = self.root / ref
        if not path.is_file():
            raise SpecError([document.issue(where, f"{ref} not found under {self.root}")])
        return path

    def serving(self, path: Path) -> None:
        document = load_yaml_document(path)
        spec = validate_document(document, ServingSpec)
        self.serving_model(document, spec)

    def serving_model(self, document: YamlDocument, spec: ServingSpec) -> None:
        issues: list[SpecIssue] = []
        resolve_pipeline(
            self.referenced(document, ("pipeline",), spec.pipeline), self.root, self.data_root
        )
        gold = load_gold_spec(self.referenced(document, ("gold",), spec.gold))
        gold_outputs = set(gold.outputs)
        issues += self.signal_params(document, spec)
        for index, entry in enumerate(spec.stream.silver):
            if entry.field in gold_outputs or entry.field == SIGNAL_SCORE_FIELD:
                issues.append(
                    document.issue(
                        ("stream", "silver", index, "field"),
                        f"{entry.field!r} is a gold output; gold never travels on the silver wire",
                    )
                )
            elif entry.field not in SILVER_WIRE_FIELDS:
                issues.append(
                    document.issue(
                        ("stream", "silver", index, "field"),
                        f"silver does not emit {entry.field!r}",
                    )
                )
        for index, entry in enumerate(spec.stream.gold):
            if entry.field not in gold_outputs and entry.field != SIGNAL_SCORE_FIELD:
                known = ", ".join([*gold.outputs, SIGNAL_SCORE_FIELD])
                issues.append(
                    document.issue(
                        ("stream", "gold", index, "field"),
                        f"the model does not emit {entry.field!r} (it emits: {known})",
                    )
                )
        if issues:
            raise SpecError(issues)

    def signal_params(self, document: YamlDocument, spec: ServingSpec) -> list[SpecIssue]:
        """Each parameter checked against the registry, located at its own line."""
        try:
            signal = get_signal(spec.signal.name)
        except SignalError as exc:
            return [document.issue(("signal", "name"), str(exc))]
        issues = [
            issue
            for name, value in spec.signal.params.items()
            if (issue := _param_issue(document, ("signal", "params", name), signal, name, value))
        ]
        if not issues:
            try:
                validate_params(signal.name, spec.signal.params)  # rules across parameters
            except SignalError as exc:
                issues.append(document.issue(("signal", "params"), str(exc)))
        return issues

    def experiment(self, path: Path) -> ExperimentSpec:
        document = load_yaml_document(path)
        spec = validate_document(document, ExperimentSpec)
        serving_path = self.referenced(document, ("serving",), spec.serving)
        serving_document = load_yaml_document(serving_path)
        serving = validate_document(serving_document, ServingSpec)
        self.serving_model(serving_document, serving)
        for index, ref in enumerate(spec.dataset.pipelines):
            resolve_pipeline(
                self.referenced(document, ("dataset", "pipelines", index), ref),
                self.root,
                self.data_root,
            )
        issues: list[SpecIssue] = []
        signal = get_signal(serving.signal.name)
        for name, values in spec.sweep.signal_params.items():
            for index, value in enumerate(values):
                where = ("sweep", "signal_params", name, index)
                issue = _param_issue(document, where, signal, name, value)
                if issue is not None:
                    issues.append(issue)
        if issues:
            raise SpecError(issues)
        return spec


def _param_issue(
    document: YamlDocument,
    where: tuple[str | int, ...],
    signal: Signal,
    name: str,
    value: object,
) -> SpecIssue | None:
    """The problem with one signal parameter value, located at ``where``, if any."""
    declared = {p.name: p for p in signal.params}
    if name not in declared:
        return document.issue(
            where,
            f"signal {signal.name!r} has no parameter {name!r} (parameters: {', '.join(declared)})",
        )
    try:
        declared[name].check(signal.name, value)
    except SignalError as exc:
        return document.issue(where, str(exc))
    return None


def spec_files(paths: Iterable[Path]) -> list[Path]:
    """Every YAML file named or found below the given paths, sorted."""
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
        else:
            found.add(path)
    return sorted(found)


def validate_configs(
    paths: Sequence[Path] = (),
    *,
    root: Path | None = None,
    data_root: Path | None = None,
) -> ValidationReport:
    """Validate ``paths`` (default: the whole root) against the configs ``root``."""
    configs = root or default_configs_root()
    validator = _Validator(configs, data_root or default_data_root())
    report = ValidationReport()
    for path in spec_files(paths or [configs]):
        report.checked.append(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecationWarning)
            try:
                validator.check(path)
            except SpecError as exc:
                report.issues.extend(exc.issues)
        report.deprecations += [f"{path}: {w.message}" for w in caught]
    return report


def validate_experiment(
    path: Path, *, root: Path | None = None, data_root: Path | None = None
) -> ExperimentSpec:
    """Validate one experiment spec wherever it lives, its references resolved under ``root``:
    the checks ``qmachina config validate`` runs on a file under ``experiments/`` (the model, the
    referenced serving spec and pipelines, every swept signal parameter). Raises
    :class:`SpecError` listing every problem found."""
    configs = root or default_configs_root()
    return _Validator(configs, data_root or default_data_root()).experiment(path)


def validate_serving(
    path: Path,
    *,
    root: Path | None = None,
    data_root: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ServingSpec:
    """Validate one serving spec wherever it lives, its references resolved under ``root``: the
    checks ``qmachina config validate`` runs on a file under ``serving/`` (the model, the
    referenced pipeline and gold spec, every signal parameter, the stream schema).
    ``overrides`` replace top-level fields of the file before it is checked (a sweep point's
    signal and scoring), so they pass exactly the same checks; their issues are located at the
    line of the field they replace. Raises :class:`SpecError` listing every problem found."""
    configs = root or default_configs_root()
    validator = _Validator(configs, data_root or default_data_root())
    document = load_yaml_document(path)
    if overrides:
        if not isinstance(document.data, dict):
            raise SpecError([document.issue((), "expected a mapping of fields")])
        document = YamlDocument(document.file, {**document.data, **overrides}, document.lines)
    spec = validate_document(document, ServingSpec)
    validator.serving_model(document, spec)
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qmachina.validate_configs [--root DIR] [PATHS...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = None
    if args[:1] == ["--root"] and len(args) > 1:
        root = Path(args[1])
        args = args[2:]
    report = validate_configs([Path(a) for a in args], root=root)
    for line in report.deprecations:
        print(f"deprecated: {line}", file=sys.stderr)
    for issue in report.issues:
        print(issue, file=sys.stderr)
    print(f"{len(report.checked)} spec files checked, {len(report.issues)} problems")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
