"""Experiment specs accepted for a sweep, kept by content: ``<root>/<spec hash>.yaml``.

A spec is accepted only after the checks ``qmachina config validate`` runs on a file under
``experiments/`` (the model, its references, every swept signal parameter). An inline spec (sent
as JSON) is staged in the archive, validated there and kept under its hash only once valid; a
spec named by its path under the configs root is archived too, so every job's spec can be read
back from the hash the job carries.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.identity import spec_hash
from qmachina.specs.yaml_loader import load_spec
from qmachina.validate_configs import validate_experiment

INLINE_SPEC = "<inline spec>"
"""The file named by the issues of an inline spec (its staged copy is never kept)."""


@dataclass(frozen=True)
class AcceptedExperiment:
    """A validated experiment, its canonical hash and what the sweep's workers load."""

    spec: ExperimentSpec
    spec_hash: str
    experiment: str
    """The spec file: relative to the configs root, or absolute (an archived inline spec)."""


class ExperimentArchive:
    """The accepted experiment specs under ``root``, one file per canonical hash."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, experiment_hash: str) -> Path:
        """Where the spec with this hash is kept (it may not be)."""
        return self.root / f"{experiment_hash}.yaml"

    def load(self, experiment_hash: str) -> ExperimentSpec | None:
        """The archived spec with this hash; None if none was accepted here."""
        path = self.path_of(experiment_hash)
        if not path.is_file():
            return None
        return load_spec(path, ExperimentSpec)

    def accept_file(
        self, relative: str, *, configs_root: Path, data_root: Path
    ) -> AcceptedExperiment:
        """Validate the spec at ``relative`` (a path inside ``configs_root``, without ``..``)
        and archive it.

        Raises :class:`SpecError` naming the file, line and field of every problem.
        """
        path = configs_root / relative
        inside = path.resolve().is_relative_to(configs_root.resolve())
        if Path(relative).is_absolute() or ".." in Path(relative).parts or not inside:
            raise SpecError.single(
                relative, None, "", f"not a path inside the configs root {configs_root}"
            )
        spec = validate_experiment(path, root=configs_root, data_root=data_root)
        accepted = AcceptedExperiment(spec, spec_hash(spec), relative)
        if not self.path_of(accepted.spec_hash).is_file():
            staged = self._stage(path.read_text(encoding="utf-8"))
            self._keep(staged, accepted.spec_hash)
        return accepted

    def accept_inline(
        self, content: Mapping[str, object], *, configs_root: Path, data_root: Path
    ) -> AcceptedExperiment:
        """Validate an inline spec (its references resolved under ``configs_root``) and keep
        it as ``<root>/<hash>.yaml``; an invalid one leaves nothing behind.

        Raises :class:`SpecError` whose issues in the spec itself name :data:`INLINE_SPEC`.
        """
        staged = self._stage(yaml.safe_dump(dict(content), sort_keys=False, allow_unicode=True))
        try:
            try:
                spec = validate_experiment(staged, root=configs_root, data_root=data_root)
            except SpecError as error:
                raise SpecError([_inline(issue, staged) for issue in error.issues]) from None
            experiment_hash = spec_hash(spec)
            kept = self._keep(staged, experiment_hash)
        finally:
            staged.unlink(missing_ok=True)
        return AcceptedExperiment(spec, experiment_hash, str(kept.resolve()))

    def _stage(self, text: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        staged = self.root / f".staged-{uuid.uuid4().hex}.yaml"
        staged.write_text(text, encoding="utf-8")
        return staged

    def _keep(self, staged: Path, experiment_hash: str) -> Path:
        # Equal hashes mean equal effective specs: the first copy kept stands for all.
        target = self.path_of(experiment_hash)
        if target.is_file():
            staged.unlink()
        else:
            os.replace(staged, target)
        return target


def _inline(issue: SpecIssue, staged: Path) -> SpecIssue:
    """An issue of the staged copy, re-addressed to the inline spec; its lines are those of a
    file the client never saw, so they are dropped."""
    if issue.file != str(staged):
        return issue
    return SpecIssue(INLINE_SPEC, None, issue.field, issue.message)
