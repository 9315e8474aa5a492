"""Authentication for real: tokens of the local dev issuer and of an external issuer (its JWKS
served over HTTP by a small server in this module) checked by the API served by uvicorn, on a
Temporal dev server and a SQLite store; nothing of the verification is replaced."""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.routing import iter_route_contexts
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from api.app import create_app
from qmachina.auth import (
    DEV_ISSUER,
    AuthenticationError,
    BadSignatureError,
    DevIssuer,
    DevIssuerError,
    DisallowedAlgorithmError,
    ExpiredTokenError,
    KeySetUnavailableError,
    MalformedTokenError,
    MissingClaimError,
    MissingTokenError,
    NotYetValidError,
    TokenVerifier,
    UnknownKeyError,
    WrongAudienceError,
    WrongIssuerError,
    mint_token,
)
from qmachina.auth.dev_issuer import key_file
from qmachina.cli import app as cli
from qmachina.settings import Settings, SettingsError, load_settings, variable_names
from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from tests.live_server import BackgroundLoop, start_dev_server
from tests.ports import free_port

T = TypeVar("T")
JOBS = "/v1/jobs/experiments"
PUBLIC_ROUTES = {
    "/v1/health",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/.well-known/jwks.json",
    "/.well-known/openid-configuration",
}
"""The only routes answered without a token."""
EXTERNAL_ISSUER = "https://idp.example"
runner = CliRunner()


class AuthStack(BackgroundLoop):
    """A dev server, a store and apps served by uvicorn, on one event loop in a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.store_url = default_sqlite_url(data_dir)
        super().__init__("auth-stack")

    async def start(self) -> None:
        """The store's default workspace is owned by alice; carol (of the external issuer) and
        whoever runs the tests (the CLI's own subject) read it."""
        await bootstrap_store(self.store_url, owner="alice")
        engine = create_store_engine(self.store_url)
        try:
            async with session_factory(engine).begin() as session:
                default = await repo.workspace_by_slug(session, "default")
                assert default is not None
                for subject in ("carol", getpass.getuser()):
                    await governance.set_member_role(session, default.id, subject, "viewer")
        finally:
            await engine.dispose()
        env = await self.resources.enter_async_context(await start_dev_server())
        self.temporal_address = env.client.service_client.config.target_host
        self.app = create_app(self.settings())
        self.base_url = await self.serve(self.app)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": self.data_dir,
            "database_url": self.store_url,
            "temporal_address": self.temporal_address,
        }
        return load_settings(**(values | overrides))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthStack]:
    live = AuthStack(tmp_path_factory.mktemp("auth"))
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No qMachina setting nor token of the developer's shell reaches the CLI."""
    for field in Settings.model_fields:
        for variable in variable_names(field):
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("QMACHINA_SETTINGS_FILE", raising=False)
    monkeypatch.delenv("QMACHINA_TOKEN", raising=False)
    return monkeypatch


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims of the dev issuer for the default audience, with ``changes`` (None drops
    a claim)."""
    now = int(time.time())
    base = {"iss": DEV_ISSUER, "sub": "mallory", "aud": "qmachina", "iat": now, "exp": now + 600}
    merged = base | changes
    return {name: value for name, value in merged.items() if value is not None}


def hs256_with_public_key(dev: DevIssuer) -> str:
    """The algorithm-confusion forgery: an HMAC keyed with the published public key."""
    header = b64(json.dumps({"alg": "HS256", "kid": dev.key_id, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    secret = json.dumps(dev.public_jwk).encode()
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def spliced(settings: Settings) -> str:
    """A valid token whose payload is swapped for another user's: the signature no longer
    matches."""
    mine = mint_token(settings, "mallory").split(".")
    theirs = mint_token(settings, "alice").split(".")
    return ".".join([mine[0], theirs[1], mine[2]])


@dataclass(frozen=True)
class Refusal:
    make: Callable[[AuthStack, DevIssuer], str]
    error: type[AuthenticationError]
    reason: str


REFUSALS = {
    "expired": Refusal(
        lambda s, _: mint_token(s.settings(), "u", 60, now=time.time() - 3600),
        ExpiredTokenError,
        "the token has expired",
    ),
    "wrong audience": Refusal(
        lambda s, _: mint_token(s.settings(oidc_audience="another-api"), "u"),
        WrongAudienceError,
        "not for this API's audience 'qmachina'",
    ),
    "wrong issuer": Refusal(
        lambda _, dev: dev.sign(claims(iss=EXTERNAL_ISSUER)),
        WrongIssuerError,
        f"not issued by '{DEV_ISSUER}'",
    ),
    "tampered payload": Refusal(
        lambda s, _: spliced(s.settings()), BadSignatureError, "signature does not verify"
    ),
    "another key under the issuer's kid": Refusal(
        lambda _, dev: jwt.encode(
            claims(),
            ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256",
            headers={"kid": dev.key_id},
        ),
        BadSignatureError,
        "signature does not verify",
    ),
    "unknown kid": Refusal(
        lambda _, dev: jwt.encode(
            claims(),
            ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256",
            headers={"kid": "stranger"},
        ),
        UnknownKeyError,
        "key id 'stranger' is not the dev issuer's key",
    ),
    "no kid": Refusal(
        lambda _, dev: jwt.encode(claims(), dev.private_key, algorithm="ES256"),
        UnknownKeyError,
        "names no key id",
    ),
    "alg none": Refusal(
        lambda _, dev: jwt.encode(claims(), "", algorithm="none", headers={"kid": dev.key_id}),
        DisallowedAlgorithmError,
        "signed with 'none'",
    ),
    "HS256 keyed with the public key": Refusal(
        lambda _, dev: hs256_with_public_key(dev),
        DisallowedAlgorithmError,
        "signed with 'HS256'",
    ),
    "not valid yet": Refusal(
        lambda _, dev: dev.sign(claims(nbf=int(time.time()) + 3600)),
        NotYetValidError,
        "not valid yet",
    ),
    "no subject": Refusal(
        lambda _, dev: dev.sign(claims(sub=None)), MissingClaimError, "lacks the 'sub' claim"
    ),
    "no expiry": Refusal(
        lambda _, dev: dev.sign(claims(exp=None)), MissingClaimError, "lacks the 'exp' claim"
    ),
    "not a JWT": Refusal(lambda _s, _d: "not-a-jwt", MalformedTokenError, "not a JWT"),
}


def test_a_valid_token_is_accepted(stack: AuthStack) -> None:
    token = mint_token(stack.settings(), "alice")
    principal = TokenVerifier.from_settings(stack.settings()).verify_token(token)
    assert (principal.subject, principal.issuer) == ("alice", DEV_ISSUER)
    assert principal.claims["aud"] == "qmachina"
    assert principal.expires_at.timestamp() == principal.claims["iat"] + 3600
    response = httpx.get(f"{stack.base_url}{JOBS}", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json() == {"jobs": []}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_token_is_a_401_naming_the_reason(stack: AuthStack, case: str) -> None:
    refusal = REFUSALS[case]
    dev = DevIssuer.load(stack.data_dir)
    token = refusal.make(stack, dev)
    with pytest.raises(refusal.error) as raised:
        TokenVerifier.from_settings(stack.settings()).verify_token(token)
    assert refusal.reason in str(raised.value)

    response = httpx.get(f"{stack.base_url}{JOBS}", headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": str(raised.value), "issues": []}
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="qmachina", error="invalid_token", ')
    description = re.fullmatch(r'.*error_description="([^"]*)"', challenge)
    assert description is not None
    assert refusal.reason.replace('"', "'") in description.group(1)


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "no bearer token"),
        ("Basic YWxpY2U6c2VjcmV0", "does not carry a Bearer token"),
        ("Bearer", "does not carry a Bearer token"),
    ],
)
def test_a_request_without_a_bearer_token_is_a_401(
    stack: AuthStack, authorization: str | None, reason: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.get(f"{stack.base_url}{JOBS}", headers=headers)
    assert response.status_code == 401
    assert reason in response.json()["detail"]
    # No token at all: a challenge without an error code (RFC 6750, section 3.1).
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="qmachina"'
    assert issubclass(MissingTokenError, AuthenticationError)


def test_no_route_but_the_public_ones_answers_without_a_valid_token(stack: AuthStack) -> None:
    bad = mint_token(stack.settings(oidc_audience="another-api"), "u")
    checked: list[str] = []
    websockets: list[str] = []
    public: set[str] = set()
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        for route in iter_route_contexts(stack.app.routes):
            assert route.path is not None
            if route.methods is None:  # a WebSocket: accepted, then closed with 4401
                for token in (None, "not-a-jwt", bad):
                    code = websocket_close_code(stack.base_url, route.path, token)
                    assert code == 4401, f"WS {route.path} {token}"
                websockets.append(route.path)
                continue
            if route.path in PUBLIC_ROUTES:
                public.add(route.path)
                assert http.get(route.path).status_code == 200, route.path
                continue
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                for headers in ({}, bearer("not-a-jwt"), bearer(bad)):
                    response = http.request(method, path, headers=headers)
                    assert response.status_code == 401, f"{method} {route.path} {headers}"
                    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
                    assert set(response.json()) == {"detail", "issues"}
                checked.append(f"{method} {route.path}")
    assert public == PUBLIC_ROUTES
    assert websockets == ["/v1/stream"]
    assert len(checked) == 45, checked  # every /v1 route but health


def websocket_close_code(base_url: str, path: str, token: str | None) -> int | None:
    """The close code of a WebSocket opened at ``path`` with ``token`` (None: none sent)."""
    headers = None if token is None else bearer(token)
    url = base_url.replace("http://", "ws://") + path
    with (
        ws_connect(url, additional_headers=headers, open_timeout=10) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=10)
    return None if closed.value.rcvd is None else closed.value.rcvd.code


def test_the_jwks_route_serves_the_public_key_only(stack: AuthStack) -> None:
    dev = DevIssuer.load(stack.data_dir)
    response = httpx.get(f"{stack.base_url}/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jwk-set+json"
    [key] = response.json()["keys"]
    assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert key["kid"] == dev.key_id
    private_part = ECAlgorithm.to_jwk(dev.private_key, as_dict=True)["d"]
    assert private_part not in response.text
    # What is published verifies what the issuer mints.
    token = mint_token(stack.settings(), "alice")
    verified = jwt.decode(token, PyJWK(key), algorithms=["ES256"], audience="qmachina")
    assert verified["sub"] == "alice"

    path = key_file(stack.data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    discovery = httpx.get(f"{stack.base_url}/.well-known/openid-configuration").json()
    assert discovery["issuer"] == DEV_ISSUER
    assert discovery["jwks_uri"] == f"{stack.base_url}/.well-known/jwks.json"


def test_the_dev_issuer_keeps_one_key_and_refuses_a_readable_one(tmp_path: Path) -> None:
    first = DevIssuer.load(tmp_path)
    assert DevIssuer.load(tmp_path).key_id == first.key_id
    assert list(key_file(tmp_path).parent.iterdir()) == [key_file(tmp_path)]
    key_file(tmp_path).chmod(0o644)
    with pytest.raises(DevIssuerError, match=r"readable by others \(mode 0644\)"):
        DevIssuer.load(tmp_path)


def test_qmachina_token_round_trips_through_the_api(
    stack: AuthStack, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("QMACHINA_DATA_DIR", str(stack.data_dir))
    printed = runner.invoke(cli, ["token", "--user", "alice", "--ttl", "120"])
    assert printed.exit_code == 0, printed.output
    token = printed.stdout.strip()
    unverified = jwt.decode(token, options={"verify_signature": False})
    assert (unverified["sub"], unverified["iss"]) == ("alice", DEV_ISSUER)
    assert unverified["exp"] - unverified["iat"] == 120
    assert httpx.get(f"{stack.base_url}{JOBS}", headers=bearer(token)).status_code == 200
    mine = runner.invoke(cli, ["token"])
    assert jwt.decode(mine.stdout.strip(), options={"verify_signature": False})["sub"] == (
        getpass.getuser()
    )

    # The sweep commands mint their own token from the same key, or send the one given.
    api = f"--api={stack.base_url}"
    minted = runner.invoke(cli, ["sweep", "status", "no-such-job", api])
    assert minted.exit_code == 2
    assert "HTTP 404: experiment job no-such-job not found" in minted.stderr
    given = runner.invoke(cli, ["sweep", "status", "no-such-job", api, "--token", "not-a-jwt"])
    assert given.exit_code == 2
    assert "HTTP 401: the bearer token is not a JWT" in given.stderr
    assert "pass --token or set QMACHINA_TOKEN" in given.stderr

    clean_env.setenv("QMACHINA_OIDC_ISSUER", EXTERNAL_ISSUER)
    clean_env.setenv("QMACHINA_OIDC_JWKS_URL", f"{EXTERNAL_ISSUER}/jwks.json")
    refused = runner.invoke(cli, ["token", "--user", "alice"])
    assert refused.exit_code == 2
    assert f"tokens come from the external issuer {EXTERNAL_ISSUER}" in refused.stderr
    assert refused.stdout == ""


class JwksServer:
    """A JWKS document served over HTTP on a free port, counting how often it is fetched."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = json.dumps(server.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self._thread.join()


@pytest.fixture
def idp_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_server(idp_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    public = RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True)
    server = JwksServer({"keys": [public | {"kid": "idp-1", "alg": "RS256", "use": "sig"}]})
    try:
        yield server
    finally:
        server.close()


def idp_token(key: rsa.RSAPrivateKey, kid: str = "idp-1", **changes: Any) -> str:
    return jwt.encode(
        claims(**({"iss": EXTERNAL_ISSUER, "sub": "carol"} | changes)),
        key,
        algorithm="RS256",
        headers={"kid": kid},
    )


def test_a_remote_jwks_is_fetched_once_and_verifies_the_external_issuer(
    stack: AuthStack, jwks_server: JwksServer, idp_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    settings = stack.settings(
        data_dir=tmp_path, oidc_issuer=EXTERNAL_ISSUER, oidc_jwks_url=jwks_server.url
    )
    verifier = TokenVerifier.from_settings(settings)
    assert jwks_server.fetches == 0  # fetched when a token first needs it
    principal = verifier.verify_token(idp_token(idp_key))
    assert (principal.subject, principal.issuer) == ("carol", EXTERNAL_ISSUER)
    verifier.verify_token(idp_token(idp_key, sub="dave"))
    assert jwks_server.fetches == 1  # the key set is cached

    with pytest.raises(UnknownKeyError, match="'idp-2' is not in the issuer's key set"):
        verifier.verify_token(idp_token(idp_key, kid="idp-2"))
    with pytest.raises(WrongIssuerError):
        verifier.verify_token(idp_token(idp_key, iss="https://other.example"))
    with pytest.raises(WrongAudienceError):
        verifier.verify_token(idp_token(idp_key, aud="another-api"))
    with pytest.raises(ExpiredTokenError):
        verifier.verify_token(idp_token(idp_key, exp=int(time.time()) - 60))
    forged = idp_token(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(BadSignatureError):
        verifier.verify_token(forged)
    dev_token = mint_token(stack.settings(), "alice")  # ES256 is accepted, its key is not
    with pytest.raises(UnknownKeyError):
        verifier.verify_token(dev_token)

    # The API with this issuer: its tokens pass, the dev issuer's do not, and no dev key is
    # made nor served.
    url = stack.run(stack.serve(create_app(settings)))
    accepted = httpx.get(f"{url}{JOBS}", headers=bearer(idp_token(idp_key)))
    assert accepted.status_code == 200, accepted.text
    refused = httpx.get(f"{url}{JOBS}", headers=bearer(dev_token))
    assert refused.status_code == 401
    assert "is not in the issuer's key set" in refused.json()["detail"]
    assert httpx.get(f"{url}/.well-known/jwks.json").status_code == 404
    assert not key_file(tmp_path).exists()


def test_an_unreachable_jwks_is_a_503_not_a_verdict(stack: AuthStack, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/jwks.json"
    settings = stack.settings(data_dir=tmp_path, oidc_issuer=EXTERNAL_ISSUER, oidc_jwks_url=closed)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(KeySetUnavailableError, match="could not be fetched"):
        TokenVerifier.from_settings(settings).verify_token(idp_token(key))
    url = stack.run(stack.serve(create_app(settings)))
    response = httpx.get(f"{url}{JOBS}", headers=bearer(idp_token(key)))
    assert response.status_code == 503
    assert closed in response.json()["detail"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"oidc_issuer": EXTERNAL_ISSUER}, "oidc_jwks_url: Value error, an external issuer"),
        ({"oidc_jwks_url": "https://idp.example/jwks"}, "the local dev issuer reads its key"),
        ({"oidc_issuer": "idp.example", "oidc_jwks_url": "https://x"}, "oidc_issuer: Value"),
        ({"oidc_algorithms": ["RS256", "none"]}, "not an accepted signature algorithm: 'none'"),
        ({"oidc_algorithms": ["HS256"]}, "not an accepted signature algorithm: 'HS256'"),
        ({"token_ttl_seconds": 5}, "token_ttl_seconds: Input should be greater than or equal"),
    ],
)
def test_authentication_settings_are_validated(
    clean_env: pytest.MonkeyPatch, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(**overrides)
    assert message in str(raised.value)
