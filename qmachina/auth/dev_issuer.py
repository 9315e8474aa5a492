"""The local dev issuer of the embedded default: an ES256 key pair kept in the data directory.

The key is generated on first use as ``<data_dir>/auth/dev_issuer_key.pem`` (mode 0600, its
folder 0700) and never replaced, so every process of one data directory (``qmachina up``'s API,
``qmachina token``, the ``sweep`` commands) mints and verifies with the same key. Whoever can
read that file can mint tokens: it is the dev issuer's whole trust.

The issuer name is fixed rather than the API's URL, so a token stays valid whatever host or port
the API is served on; the key, not the name, ties a token to its data directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from jwt.algorithms import ECAlgorithm

from qmachina.auth.errors import DevIssuerError
from qmachina.settings import MAX_TOKEN_TTL_SECONDS, Settings

DEV_ISSUER = "urn:qmachina:dev-issuer"
"""The ``iss`` of every token the dev issuer mints."""
DEV_ALGORITHM = "ES256"
KEY_FILE_NAME = "dev_issuer_key.pem"
PRIVATE_MODE = 0o600


def key_file(data_dir: Path) -> Path:
    """Where the dev issuer of ``data_dir`` keeps its private key."""
    return data_dir / "auth" / KEY_FILE_NAME


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of an EC public key: its key id."""
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return _base64url(hashlib.sha256(canonical).digest())


def _write_new_key(path: Path) -> None:
    """Write a fresh key unless another process got there first: the first key written wins,
    and no reader ever sees a partial file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as output:
            output.write(pem)
            output.flush()
            os.fsync(output.fileno())
        with contextlib.suppress(FileExistsError):  # a link never replaces an existing key
            os.link(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DevIssuerError(
            f"{path}: the dev issuer's private key is readable by others (mode {mode:04o}): "
            f"`chmod 600 {path}`, or delete it to have a new one made (tokens minted with it "
            "stop working)"
        )
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise DevIssuerError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise DevIssuerError(f"{path}: not a P-256 (ES256) private key")
    return key


@dataclass(frozen=True)
class DevIssuer:
    """The dev issuer of one data directory: its key, key id and JWKS."""

    private_key: ec.EllipticCurvePrivateKey
    key_file: Path

    @classmethod
    def load(cls, data_dir: Path) -> DevIssuer:
        """The dev issuer of ``data_dir``, its key generated on first use."""
        path = key_file(data_dir)
        if not path.exists():
            _write_new_key(path)
        return cls(_read_key(path), path)

    @cached_property
    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK, with its key id, algorithm and use: no private part."""
        jwk: dict[str, str] = ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        public = {name: str(jwk[name]) for name in ("kty", "crv", "x", "y")}
        return public | {"kid": jwk_thumbprint(public), "alg": DEV_ALGORITHM, "use": "sig"}

    @property
    def key_id(self) -> str:
        return self.public_jwk["kid"]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JSON Web Key Set document the API serves for this issuer."""
        return {"keys": [self.public_jwk]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A JWT of ``claims`` signed with this issuer's key (no claim is added or checked)."""
        return jwt.encode(
            dict(claims),
            self.private_key,
            algorithm=DEV_ALGORITHM,
            headers={"kid": self.key_id, "typ": "JWT"},
        )

    def mint(
        self, subject: str, audience: str, ttl_seconds: int, *, now: float | None = None
    ) -> str:
        """A token for ``subject``, valid for ``ttl_seconds`` from ``now`` (default: the clock)."""
        if not subject.strip():
            raise DevIssuerError("a token needs a non-empty subject (the user it is for)")
        if not 1 <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS:
            raise DevIssuerError(
                f"a token's lifetime is 1 to {MAX_TOKEN_TTL_SECONDS} seconds, not {ttl_seconds}"
            )
        issued = int(time.time() if now is None else now)
        return self.sign(
            {
                "iss": DEV_ISSUER,
                "sub": subject,
                "aud": audience,
                "iat": issued,
                "nbf": issued,
                "exp": issued + ttl_seconds,
                "jti": uuid.uuid4().hex,
            }
        )


def dev_issuer(settings: Settings) -> DevIssuer:
    """The dev issuer of the settings' data directory; :class:`DevIssuerError` when the
    settings name an external issuer instead."""
    if settings.oidc_issuer is not None:
        raise DevIssuerError(
            f"tokens come from the external issuer {settings.oidc_issuer} (QMACHINA_OIDC_ISSUER): "
            "get one from it; the local dev issuer mints only when no issuer is configured"
        )
    return DevIssuer.load(settings.data_dir)


def mint_token(
    settings: Settings, subject: str, ttl_seconds: int | None = None, *, now: float | None = None
) -> str:
    """A token from the dev issuer for ``subject``, for the settings' audience, valid for
    ``ttl_seconds`` (default: ``token_ttl_seconds``)."""
    ttl = settings.token_ttl_seconds if ttl_seconds is None else ttl_seconds
    return dev_issuer(settings).mint(subject, settings.oidc_audience, ttl, now=now)
