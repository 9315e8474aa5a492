"""Who is calling: the bearer token of every request but health, the OpenAPI document and the
dev issuer's discovery routes, verified by :mod:`qmachina.auth`.

The verifier is built with the app, from the settings, so a route is refused before anything
else it depends on (the store, Temporal, the workspace) is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from qmachina.auth import DevIssuer, MissingTokenError, Principal, TokenVerifier
from qmachina.settings import Settings

bearer_scheme = HTTPBearer(
    auto_error=False,  # a missing token is answered as every other error: a Problem
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An OIDC access token for the configured audience; with the local dev issuer, "
    "`qmachina token --user U` prints one",
)


@dataclass(frozen=True)
class Authentication:
    """Held on ``app.state.authentication``: the token verifier, and the dev issuer when it is
    the one in use (its JWKS is then served)."""

    verifier: TokenVerifier
    dev_issuer: DevIssuer | None


def authentication_for(settings: Settings) -> Authentication:
    """The external issuer's verifier, else the dev issuer's (its key made on first use)."""
    if settings.oidc_issuer is not None:
        return Authentication(TokenVerifier.from_settings(settings), None)
    dev = DevIssuer.load(settings.data_dir)
    return Authentication(TokenVerifier.for_dev_issuer(dev, settings.oidc_audience), dev)


def authentication(request: Request) -> Authentication:
    found: Authentication = request.app.state.authentication
    return found


def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The verified principal of the request's bearer token; a 401 otherwise.

    A plain function: FastAPI runs it in its thread pool, where fetching an external issuer's
    key set blocks no other request."""
    if credentials is None:
        if request.headers.get("Authorization"):
            raise MissingTokenError("the Authorization header does not carry a Bearer token")
        raise MissingTokenError("no bearer token: send `Authorization: Bearer <token>`")
    return authentication(request).verifier.verify_token(credentials.credentials)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
