"""Authentication: OIDC bearer JWTs verified against a JWKS, and the local dev issuer of the
embedded default (its key in ``<data_dir>/auth/``). Nothing here knows HTTP frameworks."""

from qmachina.auth.dev_issuer import DEV_ISSUER, DevIssuer, dev_issuer, mint_token
from qmachina.auth.errors import (
    AuthenticationError,
    BadSignatureError,
    DevIssuerError,
    DisallowedAlgorithmError,
    ExpiredTokenError,
    KeySetUnavailableError,
    MalformedTokenError,
    MissingClaimError,
    MissingTokenError,
    NotYetValidError,
    UnknownKeyError,
    WrongAudienceError,
    WrongIssuerError,
)
from qmachina.auth.verification import Principal, TokenVerifier

__all__ = [
    "DEV_ISSUER",
    "AuthenticationError",
    "BadSignatureError",
    "DevIssuer",
    "DevIssuerError",
    "DisallowedAlgorithmError",
    "ExpiredTokenError",
    "KeySetUnavailableError",
    "MalformedTokenError",
    "MissingClaimError",
    "MissingTokenError",
    "NotYetValidError",
    "Principal",
    "TokenVerifier",
    "UnknownKeyError",
    "WrongAudienceError",
    "WrongIssuerError",
    "dev_issuer",
    "mint_token",
]
