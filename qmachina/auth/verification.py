"""Verifying bearer tokens: an OIDC JWT, its signature checked against the issuer's JWKS, then
its ``iss``, ``aud``, ``exp``, ``nbf`` and ``iat``.

The key set is the dev issuer's own key (read from the data directory) or an external issuer's
JWKS fetched over HTTP by PyJWT's :class:`jwt.PyJWKClient`, which caches the set and refetches it
(at most every 30 s) when a token names a key id it does not hold, as after a key rotation.
Algorithms are pinned by the settings: ``none`` and HMACs are never accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import jwt
from jwt import PyJWK, PyJWKClient
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidSubjectError,
    MissingRequiredClaimError,
    PyJWKClientConnectionError,
    PyJWKClientError,
    PyJWKError,
    PyJWKSetError,
    PyJWTError,
)

from qmachina.auth.dev_issuer import DEV_ALGORITHM, DEV_ISSUER, DevIssuer
from qmachina.auth.errors import (
    BadSignatureError,
    DisallowedAlgorithmError,
    ExpiredTokenError,
    KeySetUnavailableError,
    MalformedTokenError,
    MissingClaimError,
    NotYetValidError,
    UnknownKeyError,
    WrongAudienceError,
    WrongIssuerError,
)
from qmachina.settings import Settings

LEEWAY_SECONDS = 10
"""Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat")
JWKS_CACHE_SECONDS = 300
JWKS_TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    subject: str
    issuer: str
    expires_at: datetime
    claims: Mapping[str, Any]


class KeySet(Protocol):
    """Where the verification key named by a token's ``kid`` comes from."""

    def signing_key(self, key_id: str) -> PyJWK:
        """The key, or :class:`UnknownKeyError`."""
        ...


class LocalKeySet:
    """Keys held in memory: the dev issuer's public key."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = {str(jwk["kid"]): PyJWK(dict(jwk)) for jwk in jwks["keys"]}

    def signing_key(self, key_id: str) -> PyJWK:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(
                f"the token's key id {key_id!r} is not the dev issuer's key (was it minted "
                "for another data directory?)"
            ) from None


class RemoteKeySet:
    """An external issuer's JWKS, fetched over HTTP(S) and cached."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = PyJWKClient(
            url, cache_jwk_set=True, lifespan=JWKS_CACHE_SECONDS, timeout=JWKS_TIMEOUT_SECONDS
        )

    def signing_key(self, key_id: str) -> PyJWK:
        try:
            return self._client.get_signing_key(key_id)
        except PyJWKClientConnectionError as error:
            raise KeySetUnavailableError(
                f"the issuer's key set {self.url} could not be fetched: {error}"
            ) from None
        except PyJWKClientError as error:
            # No key with this id, even after refetching the set (or no signing key at all).
            raise UnknownKeyError(
                f"the token's key id {key_id!r} is not in the issuer's key set {self.url} ({error})"
            ) from None
        except (PyJWKSetError, PyJWKError, ValueError) as error:
            raise KeySetUnavailableError(
                f"the issuer's key set {self.url} is unusable: {error}"
            ) from None


class TokenVerifier:
    """Checks bearer tokens of one issuer for one audience."""

    def __init__(self, issuer: str, audience: str, algorithms: Sequence[str], keys: KeySet) -> None:
        self.issuer = issuer
        self.audience = audience
        self.algorithms = tuple(algorithms)
        self.keys = keys

    @classmethod
    def for_dev_issuer(cls, dev: DevIssuer, audience: str) -> TokenVerifier:
        return cls(DEV_ISSUER, audience, (DEV_ALGORITHM,), LocalKeySet(dev.jwks()))

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """The external issuer's verifier, else the dev issuer's (its key made if missing)."""
        if settings.oidc_issuer is None:
            return cls.for_dev_issuer(DevIssuer.load(settings.data_dir), settings.oidc_audience)
        assert settings.oidc_jwks_url is not None  # the settings require it with an issuer
        return cls(
            settings.oidc_issuer,
            settings.oidc_audience,
            settings.oidc_algorithms,
            RemoteKeySet(settings.oidc_jwks_url),
        )

    def verify_token(self, token: str) -> Principal:
        """The principal of a valid token; an :class:`AuthenticationError` subclass naming the
        reason otherwise (:class:`KeySetUnavailableError` when the keys cannot be fetched)."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError as error:
            raise MalformedTokenError(f"the bearer token is not a JWT ({error})") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise DisallowedAlgorithmError(
                f"the token is signed with {algorithm!r}; accepted: {', '.join(self.algorithms)}"
            )
        key_id = header.get("kid")
        if not isinstance(key_id, str) or not key_id:
            raise UnknownKeyError("the token names no key id (kid) in its header")
        key = self.keys.signing_key(key_id)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": list(REQUIRED_CLAIMS), "strict_aud": False},
            )
        except InvalidSignatureError:
            raise BadSignatureError(
                f"the token's signature does not verify with key {key_id!r}"
            ) from None
        except ExpiredSignatureError:
            raise ExpiredTokenError("the token has expired") from None
        except InvalidAudienceError:
            raise WrongAudienceError(
                f"the token is not for this API's audience {self.audience!r}"
            ) from None
        except InvalidIssuerError:
            raise WrongIssuerError(f"the token is not issued by {self.issuer!r}") from None
        except ImmatureSignatureError as error:
            raise NotYetValidError(f"the token is not valid yet ({error})") from None
        except MissingRequiredClaimError as error:
            raise MissingClaimError(f"the token lacks the {error.claim!r} claim") from None
        except (InvalidSubjectError, InvalidIssuedAtError) as error:
            raise MissingClaimError(f"the token has an invalid claim: {error}") from None
        except InvalidAlgorithmError as error:
            raise DisallowedAlgorithmError(f"the token's algorithm is refused: {error}") from None
        except PyJWTError as error:
            raise MalformedTokenError(f"the token cannot be read: {error}") from None
        return Principal(
            subject=claims["sub"],
            issuer=claims["iss"],
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            claims=claims,
        )
