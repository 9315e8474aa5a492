"""Read YAML specs keeping the line of every key, and validate them into strict models.

PyYAML's node API (``compose``) keeps source marks that the plain ``safe_load`` throws
away. The document is composed once, constructed with the safe constructor, and walked to
record the line of every mapping key and sequence item, so a pydantic error location such
as ``("engine", "bin_width_ms")`` maps back to ``file.yaml:7``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from qmachina.specs.errors import FieldPath, SpecError, SpecIssue, format_field_path

ModelT = TypeVar("ModelT", bound=BaseModel)

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Specs are small; a document with more nodes than this is a mistake or an alias bomb.
_MAX_NODES = 100_000


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file: its data and the 1-based line of every key and item in it."""

    file: str
    data: object
    lines: Mapping[FieldPath, int]

    def line_of(self, path: Sequence[str | int]) -> int:
        """Line of the deepest part of ``path`` that the file spells out.

        A missing field is reported at the line of the mapping that should hold it.
        """
        line = self.lines.get((), 1)
        current: FieldPath = ()
        for part in path:
            current = (*current, part)
            found = self.lines.get(current)
            if found is None:
                break
            line = found
        return line

    def issue(self, path: Sequence[str | int], message: str) -> SpecIssue:
        """A problem with the value at ``path`` in this document."""
        return SpecIssue(self.file, self.line_of(path), format_field_path(path), message)


def load_yaml_document(path: str | Path) -> YamlDocument:
    """Parse one YAML file with the safe loader; every failure is a ``SpecError`` naming it."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError.single(file, None, "", "file not found") from None
    except UnicodeDecodeError as exc:
        raise SpecError.single(file, None, "", f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise SpecError.single(file, None, "", f"cannot read file: {exc.strerror}") from None

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise SpecError.single(file, 1, "", "file is empty; expected a mapping of fields")
        _raise_duplicate_keys(root, file)
        # types-pyyaml leaves the constructor API unannotated.
        data: object = loader.construct_document(root)  # type: ignore[no-untyped-call]
        lines = _LineRecorder(loader, file).record(root)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_syntax_error(exc, file) from None
    except yaml.YAMLError as exc:  # unmarked errors are rare (e.g. stream encoding)
        raise SpecError.single(file, None, "", f"invalid YAML: {exc}") from None
    return YamlDocument(file=file, data=data, lines=lines)


def validate_document(document: YamlDocument, model: type[ModelT]) -> ModelT:
    """Validate a parsed document into ``model``; every error cites its file and line."""
    try:
        return model.model_validate(document.data)
    except ValidationError as exc:
        raise SpecError(validation_issues(exc, document, model)) from None


def load_spec(path: str | Path, model: type[ModelT]) -> ModelT:
    """Load one YAML file and validate it into ``model``."""
    return validate_document(load_yaml_document(path), model)


def validation_issues(
    error: ValidationError,
    document: YamlDocument,
    model: type[BaseModel],
    prefix: FieldPath = (),
) -> list[SpecIssue]:
    """Turn a pydantic error into located issues, ordered by line.

    ``prefix`` places the validated data inside the document, for data validated after
    being combined from several places (e.g. engine overrides under ``engine:``).
    """
    issues = [
        document.issue((*prefix, *detail["loc"]), _message(detail, model))
        for detail in error.errors()
    ]
    return sorted(issues, key=lambda issue: issue.line or 0)


def _message(detail: ErrorDetails, model: type[BaseModel]) -> str:
    """Pydantic's message, made specific where it is vague."""
    kind = detail["type"]
    context = detail.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in context:
        return str(context["error"])
    if kind == "extra_forbidden" and detail["loc"]:
        name = str(detail["loc"][-1])
        owner = _model_at(model, detail["loc"][:-1])
        if owner is None:
            return f"unknown field {name!r}"
        known = list(owner.model_fields)
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            return f"unknown field {name!r}; did you mean {close[0]!r}?"
        return f"unknown field {name!r}; expected one of: {', '.join(known)}"
    if kind == "model_type" and not detail["loc"]:
        return f"expected a mapping of fields, got {type(detail['input']).__name__}"
    if kind.endswith("_type") and isinstance(detail["input"], str | int | float | bool):
        return f"{detail['msg']} (got {_shown(detail['input'])})"
    return detail["msg"]


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _model_at(model: type[BaseModel], path: Sequence[str | int]) -> type[BaseModel] | None:
    """The nested model class that validates the mapping at ``path``."""
    current: type[BaseModel] | None = model
    for part in path:
        if current is None:
            return None
        if isinstance(part, int):  # an item of a sequence of models
            continue
        field = current.model_fields.get(part)
        current = None if field is None else _model_in(field.annotation)
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _yaml_syntax_error(error: yaml.MarkedYAMLError, file: str) -> SpecError:
    mark = error.problem_mark or error.context_mark
    detail = "invalid YAML: "
    if error.context and error.problem and error.context_mark is not None:
        detail += f"{error.context} (line {error.context_mark.line + 1}): "
    detail += error.problem or error.context or "unreadable document"
    if mark is not None:
        detail += f" (column {mark.column + 1})"
    return SpecError.single(file, None if mark is None else mark.line + 1, "", detail)


def _raise_duplicate_keys(root: yaml.Node, file: str) -> None:
    """PyYAML keeps the last of two equal keys silently; a spec must say a thing once."""
    issues: list[SpecIssue] = []
    seen_nodes: set[int] = set()
    pending: list[yaml.Node] = [root]
    while pending:
        node = pending.pop()
        if id(node) in seen_nodes:  # aliases share nodes; check each once
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                pending.append(value_node)
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    issues.append(
                        SpecIssue(
                            file,
                            line,
                            key_node.value,
                            f"duplicate key (first given at line {first_line[key]})",
                        )
                    )
                else:
                    first_line[key] = line
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
    if issues:
        raise SpecError(sorted(issues, key=lambda issue: issue.line or 0))


class _LineRecorder:
    """Walks a constructed node tree and records the line of every key and item."""

    def __init__(self, loader: yaml.SafeLoader, file: str) -> None:
        self._loader = loader
        self._file = file
        self._lines: dict[FieldPath, int] = {}
        self._visits = 0

    def record(self, root: yaml.Node) -> dict[FieldPath, int]:
        self._lines[()] = root.start_mark.line + 1
        self._walk(root, (), frozenset())
        return self._lines

    def _walk(self, node: yaml.Node, path: FieldPath, open_nodes: frozenset[int]) -> None:
        self._visits += 1
        if self._visits > _MAX_NODES:
            raise SpecError.single(
                self._file, None, "", f"document has more than {_MAX_NODES} nodes (alias bomb?)"
            )
        if id(node) in open_nodes:  # a recursive alias; its lines are already recorded
            return
        open_nodes = open_nodes | {id(node)}
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key: object = self._loader.construct_object(key_node)  # type: ignore[no-untyped-call]
                if not isinstance(key, str | int):
                    key = str(key)
                # Merged (<<) entries come first, so an explicit key overrides their line.
                self._lines[(*path, key)] = key_node.start_mark.line + 1
                self._walk(value_node, (*path, key), open_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._lines[(*path, index)] = item.start_mark.line + 1
                self._walk(item, (*path, index), open_nodes)
