"""``/.well-known/...``: the local dev issuer's key set and a minimal discovery document.

Served only while the dev issuer is in use, without a token (a verifier must be able to fetch
the key before it holds a token), and kept out of the OpenAPI document: they are protocol
endpoints, not the ``/v1`` API.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.auth import authentication
from qmachina.auth.dev_issuer import DEV_ALGORITHM, DEV_ISSUER

router = APIRouter(prefix="/.well-known", include_in_schema=False)

JWKS_MAX_AGE_SECONDS = 300


@router.get("/jwks.json", name="dev_issuer_jwks")
def dev_issuer_jwks(request: Request) -> JSONResponse:
    """The dev issuer's JSON Web Key Set: its public key only."""
    dev = authentication(request).dev_issuer
    assert dev is not None  # the router is included only with the dev issuer
    return JSONResponse(
        dev.jwks(),
        media_type="application/jwk-set+json",
        headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE_SECONDS}"},
    )


@router.get("/openid-configuration")
def openid_configuration(request: Request) -> dict[str, Any]:
    """Where the dev issuer's keys are and how it signs. Its ``issuer`` is a fixed name, not
    this URL: tokens are tied to the data directory's key, not to the API's address."""
    return {
        "issuer": DEV_ISSUER,
        "jwks_uri": str(request.url_for("dev_issuer_jwks")),
        "id_token_signing_alg_values_supported": [DEV_ALGORITHM],
        "subject_types_supported": ["public"],
        "response_types_supported": ["token"],
    }
