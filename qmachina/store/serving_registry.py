"""The serving registry in the store: immutable serving versions, and aliases repointed with a
history and an audit trail.

Like :mod:`qmachina.store.repository`, every function takes the caller's ``AsyncSession`` and a
``workspace_id``, filters by it, flushes and never commits: a registration or a repoint commits
with its history and audit rows, or not at all.

- :func:`register_version` stores a snapshot once per workspace and content: registering the
  same content again returns the stored version, writes nothing and audits nothing. A snapshot
  that could not serve is refused, whoever built it.
- :func:`repoint_alias` is the one way an alias changes (activation, and rollback through
  :func:`rollback_alias`): it creates the alias on first use, refuses a version the workspace
  does not hold, and writes the alias, a numbered :class:`ServingAliasEvent` and an audit row
  (actor, reason, from, to). Repointing an alias at the version it already names changes nothing
  and records nothing, so a retried activity repoints once.
- Rollback undoes the latest activation not yet undone: the alias's history is replayed as a
  stack (a ``set`` pushes its version, a ``rollback`` pops), and the alias goes back to the
  version below the top. With one version on the stack there is nothing to roll back to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from qmachina.serving.snapshot import ServingSnapshot, check_servable
from qmachina.store.models import (
    ExperimentRun,
    ServingAlias,
    ServingAliasEvent,
    ServingVersion,
    new_id,
    utc_now,
)
from qmachina.store.repository import RunNotFoundError, StoreError, get_job, write_audit

ALIAS_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""An alias: lowercase letters, digits, ``.``, ``_`` and ``-``, at most 64 characters."""
FULL_HASH = re.compile(r"^[0-9a-f]{64}$")
HASH_PREFIX = re.compile(r"^[0-9a-f]{8,63}$")
"""A version id or point hash may be given by a unique prefix of at least 8 characters."""
MAX_REASON_CHARS = 2000
REASON_BLANKS = " \t\n\r\x0b\x0c"
"""A reason must hold something besides these (the API's pattern says the same)."""


class VersionNotFoundError(StoreError):
    """No serving version with this id (or prefix) in this workspace."""

    def __init__(self, workspace_id: str, ref: str) -> None:
        super().__init__(f"serving version {ref} not found in workspace {workspace_id}")
        self.workspace_id = workspace_id
        self.ref = ref


class AliasNotFoundError(StoreError):
    """No alias with this name in this workspace."""

    def __init__(self, workspace_id: str, name: str) -> None:
        super().__init__(f"serving alias {name!r} not found in workspace {workspace_id}")
        self.workspace_id = workspace_id
        self.name = name


class AmbiguousReferenceError(StoreError):
    """A prefix names more than one version (or run); more characters are needed."""

    def __init__(self, what: str, prefix: str) -> None:
        super().__init__(f"{what} prefix {prefix} is ambiguous; give more characters")


class NoRollbackTargetError(StoreError):
    """The alias has no earlier activation to go back to."""

    def __init__(self, name: str, version_id: str) -> None:
        super().__init__(
            f"serving alias {name!r} has nothing to roll back to: {version_id} is the only "
            "activation left in its history"
        )


class InvalidRepointError(StoreError):
    """An alias name or a reason the registry does not accept."""


@dataclass(frozen=True)
class Registration:
    """A registered version, and whether this call stored it (False: it was there already)."""

    version: ServingVersion
    created: bool


@dataclass(frozen=True)
class Repoint:
    """An alias after a repoint, the history event it appended (None: it already named the
    version, nothing changed) and whether the alias was created by it."""

    alias: ServingAlias
    event: ServingAliasEvent | None
    created: bool = False


def _insert(dialect: str, model: type[Any], values: dict[str, Any], key: list[str]) -> Any:
    """``INSERT ... ON CONFLICT (key) DO NOTHING RETURNING id`` in the backend's dialect."""
    if dialect == "postgresql":
        return (
            postgresql.insert(model)
            .values(values)
            .on_conflict_do_nothing(index_elements=key)
            .returning(model.id)
        )
    if dialect == "sqlite":
        return (
            sqlite.insert(model)
            .values(values)
            .on_conflict_do_nothing(index_elements=key)
            .returning(model.id)
        )
    raise StoreError(f"the serving registry supports postgresql and sqlite, not {dialect}")


async def register_version(
    session: AsyncSession, workspace_id: str, snapshot: ServingSnapshot, *, actor: str
) -> Registration:
    """Store ``snapshot`` as a version of the workspace, once: the same content registered
    again (even concurrently) returns the stored version, unchanged, with no audit row.

    The snapshot is checked again before anything is written: read back from its stored form
    (so its ``version_id`` is the hash of what is stored) and :func:`check_servable`. Raises
    :class:`~qmachina.serving.snapshot.UnservableSnapshotError` or a pydantic
    ``ValidationError`` for a snapshot that fails either.
    """
    stored = snapshot.stored()
    checked = ServingSnapshot.from_stored(stored)
    check_servable(checked)
    inserted = await session.scalar(
        _insert(
            session.get_bind().dialect.name,
            ServingVersion,
            {
                "id": new_id(),
                "workspace_id": workspace_id,
                "version_id": checked.version_id,
                "model_id": checked.content.model_id,
                "source": checked.lineage.source,
                "snapshot": stored,
                "registered_by": actor,
                "created_at": utc_now(),
            },
            ["workspace_id", "version_id"],
        )
    )
    version = await get_version(session, workspace_id, checked.version_id)
    if inserted is not None:
        lineage = checked.lineage
        await write_audit(
            session,
            workspace_id,
            actor=actor,
            action="serving_version.register",
            target=f"serving_version:{checked.version_id}",
            payload={
                "version_id": checked.version_id,
                "model_id": checked.content.model_id,
                "source": lineage.source,
                "spec_file": lineage.spec_file,
                "experiment_job_id": lineage.experiment_job_id,
                "run_point_hash": lineage.run_point_hash,
                "code_version": lineage.code_version.model_dump(),
            },
        )
    return Registration(version, created=inserted is not None)


async def get_version(session: AsyncSession, workspace_id: str, version_id: str) -> ServingVersion:
    """The version with this full id, or :class:`VersionNotFoundError`."""
    found = await session.scalar(
        sa.select(ServingVersion).where(
            ServingVersion.workspace_id == workspace_id, ServingVersion.version_id == version_id
        )
    )
    if found is None:
        raise VersionNotFoundError(workspace_id, version_id)
    return found


async def find_version(session: AsyncSession, workspace_id: str, ref: str) -> ServingVersion:
    """The version named by its full id or by a unique prefix of at least 8 characters."""
    if FULL_HASH.fullmatch(ref):
        return await get_version(session, workspace_id, ref)
    if not HASH_PREFIX.fullmatch(ref):
        raise VersionNotFoundError(workspace_id, ref)
    found = list(
        await session.scalars(
            sa.select(ServingVersion)
            .where(
                ServingVersion.workspace_id == workspace_id,
                ServingVersion.version_id.startswith(ref),
            )
            .limit(2)
        )
    )
    if not found:
        raise VersionNotFoundError(workspace_id, ref)
    if len(found) > 1:
        raise AmbiguousReferenceError("serving version", ref)
    return found[0]


async def list_versions(
    session: AsyncSession, workspace_id: str, *, limit: int | None = None, offset: int = 0
) -> list[ServingVersion]:
    """The workspace's versions, newest first."""
    rows = await session.scalars(
        sa.select(ServingVersion)
        .where(ServingVersion.workspace_id == workspace_id)
        .order_by(ServingVersion.created_at.desc(), ServingVersion.version_id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows)


async def count_versions(session: AsyncSession, workspace_id: str) -> int:
    """How many versions the workspace holds."""
    count = await session.scalar(
        sa.select(sa.func.count())
        .select_from(ServingVersion)
        .where(ServingVersion.workspace_id == workspace_id)
    )
    return count or 0


async def get_alias(
    session: AsyncSession, workspace_id: str, name: str, *, for_update: bool = False
) -> ServingAlias:
    """The alias with this name, or :class:`AliasNotFoundError`."""
    query = sa.select(ServingAlias).where(
        ServingAlias.workspace_id == workspace_id, ServingAlias.name == name
    )
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    found = await session.scalar(query)
    if found is None:
        raise AliasNotFoundError(workspace_id, name)
    return found


async def list_aliases(session: AsyncSession, workspace_id: str) -> list[ServingAlias]:
    """The workspace's aliases, by name."""
    rows = await session.scalars(
        sa.select(ServingAlias)
        .where(ServingAlias.workspace_id == workspace_id)
        .order_by(ServingAlias.name)
    )
    return list(rows)


async def alias_history(
    session: AsyncSession, workspace_id: str, name: str
) -> list[ServingAliasEvent]:
    """Every repoint of the alias, oldest first; :class:`AliasNotFoundError` if there is no
    such alias."""
    alias = await get_alias(session, workspace_id, name)
    return await _events(session, workspace_id, alias.id)


async def _events(
    session: AsyncSession, workspace_id: str, alias_id: str
) -> list[ServingAliasEvent]:
    rows = await session.scalars(
        sa.select(ServingAliasEvent)
        .where(
            ServingAliasEvent.workspace_id == workspace_id,
            ServingAliasEvent.alias_id == alias_id,
        )
        .order_by(ServingAliasEvent.seq)
    )
    return list(rows)


def rollback_target(history: Sequence[ServingAliasEvent]) -> str | None:
    """The version a rollback would repoint to: the history replayed as a stack of
    activations, the one below the top; None when there is none."""
    stack: list[str] = []
    for event in history:
        if event.kind == "rollback":
            stack.pop()
        else:
            stack.append(event.to_version_id)
    return stack[-2] if len(stack) >= 2 else None


async def repoint_alias(
    session: AsyncSession,
    workspace_id: str,
    alias: str,
    version_id: str,
    actor: str,
    reason: str,
) -> Repoint:
    """Point ``alias`` at ``version_id`` (the full id of a version of the workspace), creating
    the alias on first use; one history event and one audit row with actor, reason, from and
    to, in the caller's transaction. Pointing it at the version it names already is a no-op.

    Raises :class:`VersionNotFoundError` for a version the workspace does not hold, and
    :class:`InvalidRepointError` for an invalid alias name or an empty reason.
    """
    _checked(alias, reason)
    await get_version(session, workspace_id, version_id)
    values = {
        "id": new_id(),
        "workspace_id": workspace_id,
        "name": alias,
        "version_id": version_id,
        "last_event_seq": 0,
        "created_at": utc_now(),
        "updated_at": utc_now(),
    }
    created = await session.scalar(
        _insert(session.get_bind().dialect.name, ServingAlias, values, ["workspace_id", "name"])
    )
    row = await get_alias(session, workspace_id, alias, for_update=True)
    if created is not None:
        return await _record(session, row, None, version_id, "set", actor, reason, created=True)
    return await _repoint(session, row, version_id, "set", actor, reason)


async def rollback_alias(
    session: AsyncSession, workspace_id: str, alias: str, actor: str, reason: str
) -> Repoint:
    """Repoint ``alias`` at the version active before its latest activation not yet rolled
    back (see the module's docstring), recorded as a ``rollback``.

    Raises :class:`AliasNotFoundError` and :class:`NoRollbackTargetError`.
    """
    _checked(alias, reason)
    row = await get_alias(session, workspace_id, alias, for_update=True)
    target = rollback_target(await _events(session, workspace_id, row.id))
    if target is None:
        raise NoRollbackTargetError(alias, row.version_id)
    return await _repoint(session, row, target, "rollback", actor, reason)


def _checked(alias: str, reason: str) -> None:
    if not ALIAS_NAME.fullmatch(alias):
        raise InvalidRepointError(
            f"alias {alias!r} is not a valid name: lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64 characters"
        )
    if not reason.strip(REASON_BLANKS):
        raise InvalidRepointError(f"repointing alias {alias!r} needs a reason")
    if "\x00" in reason or len(reason) > MAX_REASON_CHARS:
        raise InvalidRepointError(
            f"a reason has at most {MAX_REASON_CHARS} characters and no NUL character"
        )


async def _repoint(
    session: AsyncSession, row: ServingAlias, version_id: str, kind: str, actor: str, reason: str
) -> Repoint:
    if row.version_id == version_id:
        return Repoint(row, None)
    return await _record(session, row, row.version_id, version_id, kind, actor, reason)


async def _record(
    session: AsyncSession,
    row: ServingAlias,
    previous: str | None,
    version_id: str,
    kind: str,
    actor: str,
    reason: str,
    *,
    created: bool = False,
) -> Repoint:
    row.version_id = version_id
    row.last_event_seq += 1
    row.updated_at = utc_now()
    event = ServingAliasEvent(
        id=new_id(),
        workspace_id=row.workspace_id,
        alias_id=row.id,
        seq=row.last_event_seq,
        kind=kind,
        from_version_id=previous,
        to_version_id=version_id,
        actor=actor,
        reason=reason,
    )
    session.add(event)
    await session.flush()
    await write_audit(
        session,
        row.workspace_id,
        actor=actor,
        action=f"serving_alias.{'rollback' if kind == 'rollback' else 'repoint'}",
        target=f"serving_alias:{row.name}",
        payload={
            "alias": row.name,
            "from": previous,
            "to": version_id,
            "reason": reason,
            "seq": event.seq,
        },
    )
    return Repoint(row, event, created)


async def resolve_reference(
    session: AsyncSession, workspace_id: str, ref: str
) -> tuple[ServingVersion, str | None]:
    """A version named by its full id, by an alias (the version it points at) or by a unique id
    prefix, in that order; with the alias's name when it was one."""
    if FULL_HASH.fullmatch(ref):
        return await get_version(session, workspace_id, ref), None
    try:
        alias = await get_alias(session, workspace_id, ref)
    except AliasNotFoundError:
        return await find_version(session, workspace_id, ref), None
    return await get_version(session, workspace_id, alias.version_id), alias.name


async def find_run(
    session: AsyncSession, workspace_id: str, job_id: str, point_ref: str
) -> ExperimentRun:
    """The run of the workspace's job named by its point hash or a unique prefix of it (at
    least 8 characters); :class:`~qmachina.store.repository.JobNotFoundError` or
    :class:`~qmachina.store.repository.RunNotFoundError` when there is none."""
    await get_job(session, workspace_id, job_id)
    conditions = [ExperimentRun.workspace_id == workspace_id, ExperimentRun.job_id == job_id]
    if FULL_HASH.fullmatch(point_ref):
        conditions.append(ExperimentRun.point_hash == point_ref)
    elif HASH_PREFIX.fullmatch(point_ref):
        conditions.append(ExperimentRun.point_hash.startswith(point_ref))
    else:
        raise RunNotFoundError(workspace_id, job_id, point_ref)
    found = list(await session.scalars(sa.select(ExperimentRun).where(*conditions).limit(2)))
    if not found:
        raise RunNotFoundError(workspace_id, job_id, point_ref)
    if len(found) > 1:
        raise AmbiguousReferenceError("point hash", point_ref)
    return found[0]
