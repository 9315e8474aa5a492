"""The bearer token a qMachina command sends to the API: the one it was given (``--token`` or
``QMACHINA_TOKEN``), else, with the local dev issuer, one it mints for the local user from the
key in the data directory, so the commands work on a fresh ``qmachina up`` with no extra step."""

from __future__ import annotations

import getpass
import time
from collections.abc import Generator

import httpx

from qmachina.auth.dev_issuer import DevIssuer, dev_issuer
from qmachina.settings import Settings

TOKEN_VARIABLE = "QMACHINA_TOKEN"
RENEW_BEFORE_SECONDS = 60
"""A minted token is replaced this long before it expires, so a long ``watch`` never sends an
expired one when it reconnects."""


def local_user() -> str:
    """The login name of whoever runs this process: the subject of the tokens it mints."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor the password database
        return "local"


class StaticBearer(httpx.Auth):
    """Sends one given token."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class DevIssuerBearer(httpx.Auth):
    """Mints tokens from the dev issuer for one subject, a new one shortly before the last
    expires."""

    def __init__(self, issuer: DevIssuer, subject: str, audience: str, ttl_seconds: int) -> None:
        self._issuer = issuer
        self._subject = subject
        self._audience = audience
        self._ttl = ttl_seconds
        self._token = ""
        self._renew_at = 0.0

    def token(self) -> str:
        now = time.time()
        if now >= self._renew_at:
            self._token = self._issuer.mint(self._subject, self._audience, self._ttl, now=now)
            self._renew_at = now + max(self._ttl - RENEW_BEFORE_SECONDS, self._ttl / 2)
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        yield request


def api_auth(settings: Settings, token: str | None = None) -> httpx.Auth:
    """``token`` when given; else tokens minted by the dev issuer for the local user.

    Raises :class:`qmachina.auth.DevIssuerError` when no token is given and the settings name
    an external issuer (whose tokens this process cannot make)."""
    if token:
        return StaticBearer(token)
    return DevIssuerBearer(
        dev_issuer(settings), local_user(), settings.oidc_audience, settings.token_ttl_seconds
    )
