"""API tokens: HS256 JWTs minted by `supervisor.py token` and checked by the web process."""
from __future__ import annotations

import time

import jwt

ALGORITHM = "HS256"
DEFAULT_DAYS = 30
SUBJECT = "civitai-daemon"
# Tolerated clock difference for `nbf`/`iat` set by another machine's minting tool.
LEEWAY_S = 30


class TokenError(Exception):
    """Why a token was refused; str() is safe to show a client (it never contains the token)."""


def mint_token(secret: str, days: float = DEFAULT_DAYS, now: float | None = None, subject: str = SUBJECT) -> str:
    if not secret:
        raise TokenError("no JWT secret is configured")
    if days <= 0:
        raise ValueError("days must be positive")
    now = time.time() if now is None else now
    claims = {"sub": subject, "iat": int(now), "exp": int(now + days * 86400)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str, now: float | None = None) -> dict:
    """The token's claims if it is an HS256 JWT signed with `secret` that has not expired.

    The algorithm list is explicit (never taken from the token's header), `exp` is required,
    and the time checks use `now` so tests can move the clock."""
    if not secret:
        raise TokenError("no JWT secret is configured on the server")
    if not token or not isinstance(token, str):
        raise TokenError("missing token")
    now = time.time() if now is None else now
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"token algorithm must be {ALGORITHM}")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp"], "verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
    except jwt.MissingRequiredClaimError:
        raise TokenError("token has no expiry (exp)") from None
    except jwt.InvalidSignatureError:
        raise TokenError("token signature does not match the server's secret") from None
    except jwt.PyJWTError:
        raise TokenError("malformed token") from None
    exp = claims.get("exp")
    if not _is_number(exp):
        raise TokenError("token expiry (exp) is not a number")
    if exp <= now:  # type: ignore[operator]
        raise TokenError("token has expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not _is_number(nbf) or nbf > now + LEEWAY_S):
        raise TokenError("token is not valid yet")
    return claims


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
