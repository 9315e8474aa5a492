"""Manual mode: a whole model given as one YAML text, checked as the stepped session checks it.

The text has exactly four top-level keys, the sections of the spec chain::

    pipeline: {...}      # a PipelineSpec
    gold: {...}          # a GoldSpec
    serving: {...}       # a ServingSpec without pipeline/gold (the chain links them)
    experiment: {...}    # an ExperimentSpec without serving; name defaults to the model_id

Any section may instead be ``{from_file: <path relative to the configs root>}``. Every problem
found is reported at its step, its field inside the section and its line in the text.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from qmachina.modeling.draft import (
    FROM_FILE,
    SECTIONS,
    STEP_OF_SECTION,
    ModelIssues,
    StepIssue,
    check_sections,
    expand_from_file,
    structural_issues,
)
from qmachina.specs.errors import FieldPath, SpecError
from qmachina.specs.yaml_loader import YamlDocument, load_yaml_document

WHOLE_MODEL = 0
"""The step of an issue with the manual document itself rather than one section."""


@dataclass(frozen=True)
class ManualModel:
    """The four sections of a valid manual model, ``from_file`` references expanded."""

    sections: dict[str, dict[str, object]]


def parse_manual(
    text: str, *, configs_root: Path, data_root: Path, source: str = "<manual model>"
) -> ManualModel:
    """Parse and fully check a manual model; raises :class:`ModelIssues` listing every problem,
    each with its step, field path in the section and 1-based line in ``text``."""
    document = _parse(text, source)
    if not isinstance(document.data, dict):
        raise ModelIssues(
            [StepIssue(WHOLE_MODEL, "", "expected a mapping with keys " + ", ".join(SECTIONS), 1)]
        )
    data: dict[object, object] = document.data
    issues = [
        StepIssue(
            WHOLE_MODEL,
            str(key),
            f"unknown section {key!r}; the sections are {', '.join(SECTIONS)}",
            document.line_of((str(key),)),
        )
        for key in data
        if key not in SECTIONS
    ]
    issues += [
        StepIssue(STEP_OF_SECTION[name], "", f"missing section {name!r}", document.line_of(()))
        for name in SECTIONS
        if name not in data
    ]

    sections: dict[str, dict[str, object]] = {}
    valid_prefix: list[str] = []
    prefix_open = True
    for name in SECTIONS:
        if name not in data:
            prefix_open = False
            continue
        step = STEP_OF_SECTION[name]
        value = data[name]
        if not isinstance(value, dict):
            issues.append(
                StepIssue(step, "", "expected a mapping of fields", document.line_of((name,)))
            )
            prefix_open = False
            continue
        from_file = FROM_FILE in value
        try:
            section = expand_from_file(step, value, configs_root)
        except ModelIssues as exc:
            issues += _placed(exc.issues, document, name, value, from_file=True)
            prefix_open = False
            continue
        sections[name] = section
        found = structural_issues(step, section)
        issues += _placed(found, document, name, section, from_file=from_file)
        if found:
            prefix_open = False
        if prefix_open:
            valid_prefix.append(name)

    # Deep checks need every section before the one checked to be well-formed.
    if valid_prefix:
        deep = check_sections(
            {name: sections[name] for name in valid_prefix},
            configs_root=configs_root,
            data_root=data_root,
        )
        issues += _placed_by_step(deep, document, sections, data)
    if issues:
        raise ModelIssues(sorted(issues, key=lambda issue: issue.line or 0))
    return ManualModel(sections=sections)


def _parse(text: str, source: str) -> YamlDocument:
    """The text as a located document, through the loader every spec file goes through."""
    with tempfile.TemporaryDirectory(prefix="qmachina-manual-") as temporary:
        # The loader reads files only; the text goes through a file so parsing stays shared.
        file = Path(temporary) / "model.yaml"
        file.write_text(text, encoding="utf-8")
        try:
            document = load_yaml_document(file)
        except SpecError as exc:
            raise ModelIssues(
                StepIssue(WHOLE_MODEL, issue.field, issue.message, issue.line)
                for issue in exc.issues
            ) from None
    return YamlDocument(source, document.data, document.lines)


def _placed_by_step(
    issues: Iterable[StepIssue],
    document: YamlDocument,
    sections: Mapping[str, Mapping[str, object]],
    data: Mapping[object, object],
) -> list[StepIssue]:
    placed: list[StepIssue] = []
    for issue in issues:
        name = SECTIONS[issue.step - 1]
        given = data[name]
        from_file = isinstance(given, Mapping) and FROM_FILE in given
        placed += _placed([issue], document, name, sections[name], from_file=from_file)
    return placed


def _placed(
    issues: Iterable[StepIssue],
    document: YamlDocument,
    section: str,
    content: Mapping[str, object],
    *,
    from_file: bool,
) -> list[StepIssue]:
    """Issues of one section with the line they point at in the manual text; a section read
    from a file is pointed at by its ``from_file`` line."""
    if from_file:
        line = document.line_of((section, FROM_FILE))
        return [replace(issue, line=line) for issue in issues]
    return [
        replace(issue, line=document.line_of((section, *_path_in(content, issue.field))))
        for issue in issues
    ]


def _path_in(data: object, dotted: str) -> FieldPath:
    """The path a dotted field names in ``data``: numbers index lists, and a key that itself
    holds dots is matched whole. Parts past what ``data`` holds are kept as text."""
    parts = dotted.split(".") if dotted else []
    path: list[str | int] = []
    current: object = data
    index = 0
    while index < len(parts):
        part = parts[index]
        if isinstance(current, list) and part.isdigit() and int(part) < len(current):
            path.append(int(part))
            current = current[int(part)]
            index += 1
            continue
        if isinstance(current, Mapping):
            matched = False
            for end in range(len(parts), index, -1):  # the longest key first
                key = ".".join(parts[index:end])
                if key in current:
                    path.append(key)
                    current = current[key]
                    index = end
                    matched = True
                    break
            if matched:
                continue
        path += parts[index:]
        break
    return tuple(path)
