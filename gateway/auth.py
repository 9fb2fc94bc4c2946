"""JWT verification and minting; what a token lets a connection do."""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from typing import Any

import jwt

from gateway.config import AuthSettings
from gateway.protocol import MAX_USER_ID, is_valid_id


class AuthError(Exception):
    """The token is missing, malformed, expired or not ours; the message says which."""


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    username: str
    rooms: tuple[str, ...]
    publish: tuple[str, ...]
    admin: bool
    # Unix seconds, or None for a token without "exp".
    expires_at: float | None

    def may_join(self, room_id: str) -> bool:
        return _matches(self.rooms, room_id)

    def may_publish(self, room_id: str) -> bool:
        return _matches(self.publish, room_id)


def _matches(patterns: tuple[str, ...], room_id: str) -> bool:
    return any(fnmatch.fnmatchcase(room_id, p) for p in patterns)


def _patterns(claims: dict[str, Any], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = claims.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        value = [p for p in value.split(",") if p]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError(f"claim '{name}' must be a list of glob patterns")
    return tuple(value)


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings

    def verify(self, token: str) -> Identity:
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                s.secret,
                algorithms=list(s.algorithms),
                audience=s.audience or None,
                issuer=s.issuer or None,
                leeway=s.leeway_seconds,
                options={"require": ["sub"], "verify_aud": bool(s.audience)},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError("token audience not accepted") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("token issuer not accepted") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("token not valid yet") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise AuthError("token algorithm not accepted") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("token signature invalid") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks required claim '{exc.claim}'") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError("token invalid") from exc
        return self.identity(claims)

    def identity(self, claims: dict[str, Any]) -> Identity:
        sub = claims.get("sub")
        if not is_valid_id(sub, MAX_USER_ID):
            raise AuthError(
                f"claim 'sub' must be 1 to {MAX_USER_ID} printable characters without whitespace"
            )
        assert isinstance(sub, str)
        name = claims.get("name", sub)
        if not isinstance(name, str) or not name or len(name) > MAX_USER_ID:
            raise AuthError("claim 'name' must be a non-empty string")
        rooms = _patterns(claims, "rooms", self._settings.default_rooms)
        publish = _patterns(claims, "publish", rooms)
        exp = claims.get("exp")
        return Identity(
            user_id=sub,
            username=name,
            rooms=rooms,
            publish=publish,
            admin=claims.get("admin") is True,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )

    def dev_identity(self, user: str) -> Identity:
        """Development mode only: a user named by ``?user=``, allowed the default rooms."""
        return self.identity({"sub": user})


def mint(
    settings: AuthSettings,
    user: str,
    *,
    name: str | None = None,
    ttl_seconds: float | None = 3600.0,
    rooms: list[str] | None = None,
    publish: list[str] | None = None,
    admin: bool = False,
    now: float | None = None,
) -> str:
    """An HS token signed with the configured secret, for development and tests."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": user, "iat": issued}
    if name:
        claims["name"] = name
    if ttl_seconds is not None:
        claims["exp"] = issued + int(ttl_seconds)
    if rooms is not None:
        claims["rooms"] = rooms
    if publish is not None:
        claims["publish"] = publish
    if admin:
        claims["admin"] = True
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience
    return jwt.encode(claims, settings.secret, algorithm=settings.algorithms[0])
