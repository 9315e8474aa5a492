"""Why a bearer token was refused, one exception type per reason.

Each message says what is wrong with the token in words a client can act on; the API answers
every :class:`AuthenticationError` with a 401 and the message as its ``error_description``.
"""

from __future__ import annotations


class AuthenticationError(Exception):
    """The request carries no valid bearer token."""


class MissingTokenError(AuthenticationError):
    """No ``Authorization: Bearer`` header."""


class MalformedTokenError(AuthenticationError):
    """Not a JWT, or one whose header or claims cannot be read."""


class DisallowedAlgorithmError(AuthenticationError):
    """Signed with an algorithm this API does not accept (``none``, an HMAC, ...)."""


class UnknownKeyError(AuthenticationError):
    """The token's key id (``kid``) is not in the issuer's key set."""


class BadSignatureError(AuthenticationError):
    """The signature does not verify with the key the token names."""


class ExpiredTokenError(AuthenticationError):
    """The token's ``exp`` has passed."""


class NotYetValidError(AuthenticationError):
    """The token's ``nbf`` or ``iat`` lies in the future."""


class WrongAudienceError(AuthenticationError):
    """The token was issued for another audience (``aud``)."""


class WrongIssuerError(AuthenticationError):
    """The token was issued by another issuer (``iss``)."""


class MissingClaimError(AuthenticationError):
    """A required claim (``sub``, ``exp``, ``iat``, ``iss``, ``aud``) is absent or invalid."""


class KeySetUnavailableError(RuntimeError):
    """The issuer's key set could not be fetched: the token cannot be checked either way."""


class DevIssuerError(RuntimeError):
    """The local dev issuer cannot mint: an external issuer is configured, or its key file is
    unusable; the message names the setting or the file."""
