"""JWT verification and minting; what a token lets a connection do."""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from typing import Any

import jwt

from broker.background import Background
from gateway.config import HMAC_ALGORITHMS, AuthSettings
from gateway.keys import KeyStore, load_private_key
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
        # Reads the JWKS file now: a bad one stops start-up (KeyFileError).
        self._keys = KeyStore(settings.jwks_file) if settings.jwks_file else None

    @property
    def keys(self) -> KeyStore | None:
        """The JWKS key store; None when no RS/ES algorithm is configured."""
        return self._keys

    def reload_keys(self) -> bool:
        """Read the JWKS file again (SIGHUP); False, old keys kept, when it is unusable."""
        return self._keys.reload() if self._keys is not None else False

    async def watch_keys(self, background: Background, interval: float) -> None:
        """Pick up a changed JWKS file every ``interval`` seconds until ``background`` stops."""
        keys = self._keys
        if keys is None or interval <= 0:
            return
        while await background.sleep(interval):
            keys.reload_if_changed()

    def verify(self, token: str) -> Identity:
        s = self._settings
        alg, key = self._verification_key(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
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
        except jwt.PyJWTError as exc:
            raise AuthError("token invalid") from exc
        return self.identity(claims)

    def _verification_key(self, token: str) -> tuple[str, str | jwt.PyJWK]:
        """The header's algorithm and the one key allowed to verify it.

        The algorithm decides the kind of key before any key is looked at: HS
        only ever gets the secret and RS/ES only a JWKS key of that exact
        algorithm, so a token cannot make a public key serve as an HMAC secret.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("token invalid") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.algorithms:
            raise AuthError("token algorithm not accepted")
        if alg in HMAC_ALGORITHMS:
            return alg, self._settings.secret
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("unknown key id: the token has no kid")
        public = self._keys.get(kid) if self._keys is not None else None
        if public is None:
            raise AuthError("unknown key id")
        key = public.for_algorithm(alg)
        if key is None:
            raise AuthError("token algorithm not accepted for its key")
        return alg, key

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
    private_key: str | None = None,
    kid: str | None = None,
    algorithm: str | None = None,
) -> str:
    """A signed token for development and tests.

    Without ``private_key``: HS, signed with the configured secret, with
    ``algorithm`` or else the first HS algorithm in ``settings.algorithms``.
    With ``private_key`` (PEM text): RS/ES, ``algorithm`` inferred from the
    key when None. ``kid`` goes into the header; the gateway needs it for RS/ES.
    ValueError when the key or algorithm does not fit.
    """
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
    headers = {"kid": kid} if kid else None
    if private_key is not None:
        signing_key, alg = load_private_key(private_key, algorithm)
        return jwt.encode(claims, signing_key, algorithm=alg, headers=headers)
    alg = algorithm or next((a for a in settings.algorithms if a in HMAC_ALGORITHMS), "")
    if not alg:
        raise ValueError("auth.algorithms has no HS algorithm: give a private key")
    if alg not in HMAC_ALGORITHMS:
        raise ValueError(f"{alg} needs a private key")
    return jwt.encode(claims, settings.secret, algorithm=alg, headers=headers)
