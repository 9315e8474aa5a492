"""The authorizer a process uses, from its settings.

With ``OPENFGA_API_URL`` set, the OpenFGA server decides, with the store and model recorded by
``qmachina authz bootstrap`` (or set by ``OPENFGA_STORE_ID`` / ``OPENFGA_MODEL_ID``); the
server keeps the tuples, which ``qmachina authz sync`` fills from the store. Otherwise the
in-process evaluator decides over the relationships the store holds at the moment of each
question (:class:`StoreAuthorizer`), so any number of API processes agree.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qmachina.authz.authorizer import (
    Authorizer,
    OpenFgaAuthorizer,
    OpenFgaConfigError,
)
from qmachina.authz.openfga_ids import resolve_openfga_ids
from qmachina.authz.store_authorizer import StoreAuthorizer
from qmachina.settings import Settings


def openfga_authorizer(settings: Settings) -> OpenFgaAuthorizer:
    """The authorizer of the configured OpenFGA server; :class:`OpenFgaConfigError` when no
    server is configured or its store and model are not known."""
    if not settings.openfga_api_url:
        raise OpenFgaConfigError(
            "no OpenFGA server is configured (set OPENFGA_API_URL); without one the in-process "
            "evaluator decides"
        )
    ids = resolve_openfga_ids(
        settings.openfga_api_url,
        settings.openfga_store_id,
        settings.openfga_model_id,
        settings.data_dir,
    )
    return OpenFgaAuthorizer(settings.openfga_api_url, ids.store_id, ids.model_id)


async def open_authorizer(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> Authorizer:
    """The OpenFGA-backed authorizer when configured, else the in-process one over the
    store."""
    if settings.openfga_api_url:
        return openfga_authorizer(settings)
    return StoreAuthorizer(sessions)


async def close_authorizer(authorizer: Authorizer) -> None:
    """Release what the authorizer holds (the OpenFGA client's HTTP session)."""
    if isinstance(authorizer, OpenFgaAuthorizer):
        await authorizer.aclose()
