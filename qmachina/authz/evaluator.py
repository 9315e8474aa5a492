"""An in-process evaluator of the OpenFGA authorization model, for when no server is configured.

It reads the JSON authorization model that ``fga model transform`` makes of ``model.fga`` (the
committed ``model.json``; a test keeps the two equal) and evaluates its userset rewrites over an
in-memory tuple set, so the rules exist once, in the DSL. It evaluates what the model uses:
direct relations restricted to concrete types (``[user]``, ``[workspace]``), computed usersets,
tuple-to-userset and union. A model that uses anything else (intersection, exclusion, userset or
wildcard type restrictions, conditions) is refused when it loads, so the evaluator can never
silently answer a question it does not understand; the differential test
(``tests/test_authz_differential.py``) proves its answers equal the real engine's.

Deny by default: a relation holds only through tuples, and a cycle in the rewrites adds nothing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FGA_PATH = Path(__file__).with_name("model.fga")
MODEL_JSON_PATH = Path(__file__).with_name("model.json")


class AuthzError(Exception):
    """Base of every authorization-model error."""


class UnsupportedModelError(AuthzError):
    """The model is malformed or uses a feature this evaluator does not evaluate."""


class UnknownTypeError(AuthzError, LookupError):
    """A type the model does not define."""


class UnknownRelationError(AuthzError, LookupError):
    """A relation the type does not define."""


class InvalidTupleError(AuthzError, ValueError):
    """A tuple or an identifier the model does not allow."""


@dataclass(frozen=True, slots=True, order=True)
class RelationTuple:
    """``user`` has ``relation`` to ``object``; ``user`` and ``object`` are ``type:id``."""

    user: str
    relation: str
    object: str

    def __str__(self) -> str:
        return f"({self.user}, {self.relation}, {self.object})"


# --- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Direct:
    """``this``: the tuples written for the relation itself."""


@dataclass(frozen=True, slots=True)
class ComputedUserset:
    """Another relation of the same object (``define viewer: editor``)."""

    relation: str


@dataclass(frozen=True, slots=True)
class TupleToUserset:
    """``computed from tupleset``: the relation on each object the tupleset relation points to."""

    tupleset: str
    computed: str


@dataclass(frozen=True, slots=True)
class AnyOf:
    """``union``: any of the children."""

    children: tuple[Rewrite, ...]


Rewrite = Direct | ComputedUserset | TupleToUserset | AnyOf


@dataclass(frozen=True, slots=True)
class RelationDefinition:
    """One relation of one type: its rewrite and the user types a tuple may name directly."""

    type_name: str
    name: str
    rewrite: Rewrite
    direct_types: frozenset[str]


@dataclass(frozen=True, slots=True)
class AuthorizationModel:
    """The type definitions of a schema 1.1 authorization model, checked for what we evaluate."""

    types: Mapping[str, Mapping[str, RelationDefinition]]
    source: str

    @classmethod
    def load(cls, path: Path = MODEL_JSON_PATH) -> AuthorizationModel:
        """Load a JSON authorization model (the output of ``fga model transform``)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UnsupportedModelError(f"{path}: cannot read the model: {exc}") from exc
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "<model>") -> AuthorizationModel:
        """Parse the JSON form; refuse anything the evaluator would not evaluate faithfully."""
        if data.get("schema_version") != "1.1":
            raise UnsupportedModelError(
                f"{source}: schema_version is {data.get('schema_version')!r}, expected '1.1'"
            )
        if data.get("conditions"):
            raise UnsupportedModelError(f"{source}: conditions are not evaluated in process")
        types: dict[str, dict[str, RelationDefinition]] = {}
        for type_def in data.get("type_definitions", []):
            type_name = type_def["type"]
            if type_name in types:
                raise UnsupportedModelError(f"{source}: type {type_name!r} is defined twice")
            metadata = (type_def.get("metadata") or {}).get("relations") or {}
            relations: dict[str, RelationDefinition] = {}
            for name, rewrite_json in (type_def.get("relations") or {}).items():
                where = f"{source}: {type_name}#{name}"
                rewrite = _parse_rewrite(rewrite_json, where)
                direct = _direct_types(metadata.get(name) or {}, where)
                if _uses_direct(rewrite) != bool(direct):
                    raise UnsupportedModelError(
                        f"{where}: a direct relation needs type restrictions and vice versa"
                    )
                relations[name] = RelationDefinition(type_name, name, rewrite, direct)
            types[type_name] = relations
        model = cls(types=types, source=source)
        model._check_references()
        return model

    def relation(self, type_name: str, relation: str) -> RelationDefinition:
        """The definition of ``type_name#relation``; unknown names raise a specific error."""
        relations = self.types.get(type_name)
        if relations is None:
            raise UnknownTypeError(f"{self.source}: unknown type {type_name!r}")
        definition = relations.get(relation)
        if definition is None:
            raise UnknownRelationError(
                f"{self.source}: type {type_name!r} has no relation {relation!r} "
                f"(it has: {', '.join(sorted(relations)) or 'none'})"
            )
        return definition

    def require_type(self, type_name: str) -> None:
        """Raise :class:`UnknownTypeError` unless the model defines ``type_name``."""
        if type_name not in self.types:
            raise UnknownTypeError(f"{self.source}: unknown type {type_name!r}")

    def validate_tuple(self, relation_tuple: RelationTuple) -> None:
        """Raise :class:`InvalidTupleError` unless the model allows writing the tuple."""
        object_type, _ = split_object(relation_tuple.object)
        user_type, _ = split_object(relation_tuple.user)
        try:
            definition = self.relation(object_type, relation_tuple.relation)
        except (UnknownTypeError, UnknownRelationError) as exc:
            raise InvalidTupleError(f"tuple {relation_tuple}: {exc}") from exc
        if user_type not in definition.direct_types:
            allowed = ", ".join(sorted(definition.direct_types)) or "nothing (it is computed)"
            raise InvalidTupleError(
                f"tuple {relation_tuple}: {object_type}#{relation_tuple.relation} may be written "
                f"for {allowed}, not {user_type!r}"
            )

    def _check_references(self) -> None:
        for type_name, relations in self.types.items():
            for definition in relations.values():
                where = f"{self.source}: {type_name}#{definition.name}"
                try:
                    for target in definition.direct_types:
                        self.require_type(target)
                    for rewrite in _walk(definition.rewrite):
                        self._check_rewrite_references(type_name, rewrite, where)
                except (UnknownTypeError, UnknownRelationError) as exc:
                    raise UnsupportedModelError(f"{where}: {exc}") from exc

    def _check_rewrite_references(self, type_name: str, rewrite: Rewrite, where: str) -> None:
        if isinstance(rewrite, ComputedUserset):
            self.relation(type_name, rewrite.relation)
        elif isinstance(rewrite, TupleToUserset):
            tupleset = self.relation(type_name, rewrite.tupleset)
            if not isinstance(tupleset.rewrite, Direct):
                raise UnsupportedModelError(
                    f"{where}: tupleset {rewrite.tupleset!r} must be a direct relation"
                )
            if not any(
                rewrite.computed in self.types.get(target, {}) for target in tupleset.direct_types
            ):
                raise UnsupportedModelError(
                    f"{where}: no type that {rewrite.tupleset!r} points to defines "
                    f"{rewrite.computed!r}"
                )


def _parse_rewrite(data: Mapping[str, Any], where: str) -> Rewrite:
    if len(data) != 1:
        raise UnsupportedModelError(f"{where}: a rewrite has exactly one key, got {sorted(data)}")
    ((kind, body),) = data.items()
    if kind == "this":
        return Direct()
    if kind == "computedUserset":
        if body.get("object"):
            raise UnsupportedModelError(f"{where}: computedUserset with an object is not supported")
        return ComputedUserset(body["relation"])
    if kind == "tupleToUserset":
        return TupleToUserset(body["tupleset"]["relation"], body["computedUserset"]["relation"])
    if kind == "union":
        return AnyOf(tuple(_parse_rewrite(child, where) for child in body["child"]))
    raise UnsupportedModelError(
        f"{where}: the model uses {kind!r}, which the in-process evaluator does not evaluate; "
        "extend the evaluator and the differential test together"
    )


def _direct_types(metadata: Mapping[str, Any], where: str) -> frozenset[str]:
    names: set[str] = set()
    for restriction in metadata.get("directly_related_user_types") or []:
        if restriction.get("relation") or "wildcard" in restriction or restriction.get("condition"):
            raise UnsupportedModelError(
                f"{where}: type restriction {restriction} is not a plain type; the in-process "
                "evaluator only evaluates [type] restrictions"
            )
        names.add(restriction["type"])
    return frozenset(names)


def _walk(rewrite: Rewrite) -> Iterator[Rewrite]:
    yield rewrite
    if isinstance(rewrite, AnyOf):
        for child in rewrite.children:
            yield from _walk(child)


def _uses_direct(rewrite: Rewrite) -> bool:
    return any(isinstance(node, Direct) for node in _walk(rewrite))


def split_object(value: str) -> tuple[str, str]:
    """Split ``type:id``; usersets (``type:id#relation``) and wildcards are not accepted here."""
    type_name, sep, object_id = value.partition(":")
    if not sep or not type_name or not object_id or "#" in value or object_id == "*":
        raise InvalidTupleError(f"{value!r} is not an object of the form 'type:id'")
    return type_name, object_id


# --- evaluation ---------------------------------------------------------------------------------


class TupleSet:
    """Tuples indexed by ``(object, relation)`` for evaluation. Not synchronised: callers lock."""

    def __init__(self, model: AuthorizationModel, tuples: Iterable[RelationTuple] = ()) -> None:
        self.model = model
        self._users: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._objects_by_type: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self.add(tuples)

    def add(self, tuples: Iterable[RelationTuple]) -> None:
        """Add tuples (each validated against the model first); adding one twice is a no-op."""
        batch = list(tuples)
        for relation_tuple in batch:
            self.model.validate_tuple(relation_tuple)
        for relation_tuple in batch:
            users = self._users[(relation_tuple.object, relation_tuple.relation)]
            if relation_tuple.user not in users:
                users.add(relation_tuple.user)
                self._count(relation_tuple.object, +1)

    def remove(self, tuples: Iterable[RelationTuple]) -> None:
        """Remove tuples; removing one that is absent is a no-op."""
        for relation_tuple in tuples:
            key = (relation_tuple.object, relation_tuple.relation)
            users = self._users.get(key)
            if users is None or relation_tuple.user not in users:
                continue
            users.discard(relation_tuple.user)
            if not users:
                del self._users[key]
            self._count(relation_tuple.object, -1)

    def has(self, user: str, relation: str, object_: str) -> bool:
        """Whether the tuple ``(user, relation, object_)`` was written."""
        users = self._users.get((object_, relation))
        return users is not None and user in users

    def users(self, object_: str, relation: str) -> frozenset[str]:
        """The users written directly for ``object#relation``."""
        return frozenset(self._users.get((object_, relation), ()))

    def objects_of_type(self, type_name: str) -> list[str]:
        """Every object of ``type_name`` that appears as the object of some tuple."""
        return sorted(self._objects_by_type.get(type_name, {}))

    def __iter__(self) -> Iterator[RelationTuple]:
        for (object_, relation), users in self._users.items():
            for user in users:
                yield RelationTuple(user, relation, object_)

    def __len__(self) -> int:
        return sum(len(users) for users in self._users.values())

    def _count(self, object_: str, delta: int) -> None:
        type_name, _ = split_object(object_)
        counts = self._objects_by_type[type_name]
        counts[object_] = counts.get(object_, 0) + delta
        if counts[object_] == 0:
            del counts[object_]


class Evaluator:
    """``check`` and ``list_objects`` of the model over a :class:`TupleSet`."""

    def __init__(self, tuples: TupleSet) -> None:
        self.tuples = tuples
        self.model = tuples.model

    def check(self, user: str, relation: str, object_: str) -> bool:
        """Whether ``user`` has ``relation`` to ``object_`` (``type:id`` each)."""
        user_type, _ = split_object(user)
        self.model.require_type(user_type)
        object_type, _ = split_object(object_)
        self.model.relation(object_type, relation)
        return self._check(user, relation, object_, frozenset())

    def list_objects(self, user: str, relation: str, type_name: str) -> list[str]:
        """Every object of ``type_name`` that ``user`` has ``relation`` to, sorted."""
        user_type, _ = split_object(user)
        self.model.require_type(user_type)
        self.model.relation(type_name, relation)
        # A relation holds only through a tuple on the object itself (directly, or as the
        # tupleset of a tuple-to-userset), so the objects named in tuples are every candidate.
        return [
            candidate
            for candidate in self.tuples.objects_of_type(type_name)
            if self._check(user, relation, candidate, frozenset())
        ]

    def _check(
        self, user: str, relation: str, object_: str, visiting: frozenset[tuple[str, str]]
    ) -> bool:
        key = (object_, relation)
        if key in visiting:
            return False  # a cycle grants nothing beyond what its other branches grant
        definition = self.model.relation(split_object(object_)[0], relation)
        return self._rewrite(user, object_, definition, definition.rewrite, visiting | {key})

    def _rewrite(
        self,
        user: str,
        object_: str,
        definition: RelationDefinition,
        rewrite: Rewrite,
        visiting: frozenset[tuple[str, str]],
    ) -> bool:
        if isinstance(rewrite, Direct):
            return self.tuples.has(user, definition.name, object_)
        if isinstance(rewrite, ComputedUserset):
            return self._check(user, rewrite.relation, object_, visiting)
        if isinstance(rewrite, TupleToUserset):
            for target in sorted(self.tuples.users(object_, rewrite.tupleset)):
                target_type, _ = split_object(target)
                # Like OpenFGA, skip targets whose type does not define the computed relation.
                if rewrite.computed in self.model.types.get(target_type, {}) and self._check(
                    user, rewrite.computed, target, visiting
                ):
                    return True
            return False
        return any(
            self._rewrite(user, object_, definition, child, visiting) for child in rewrite.children
        )
