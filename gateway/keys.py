"""Public keys for RS/ES tokens: a JWKS file, keys chosen by ``kid``, reloadable.

``parse_jwks`` and ``load_private_key`` are plain functions on text, so every
rule about which key verifies which algorithm can be tested without files.
``KeyStore`` adds the file: it re-reads it on demand (SIGHUP) or when its
stat changes, and a file that does not parse never replaces keys that work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.settings import ConfigError
from gateway.config import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS

log = structlog.get_logger("rtgate.auth")

RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
# JWK curve name -> the one algorithm that curve signs (RFC 7518 section 3.4).
EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384"}
# The same curves as cryptography names them.
_EC_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384"}

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class KeyFileError(ConfigError):
    """The JWKS file cannot be read or is not a usable key set; the message says why.

    A ``ConfigError``: at start-up it stops the gateway like any bad setting.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str
    kty: str
    # One PyJWK per token algorithm the key may verify: PyJWT binds a PyJWK to
    # a single algorithm and refuses tokens of any other, which is the check
    # we want, so an RSA JWK without "alg" gets one per RS algorithm.
    by_algorithm: Mapping[str, jwt.PyJWK]

    def for_algorithm(self, alg: str) -> jwt.PyJWK | None:
        return self.by_algorithm.get(alg)


@dataclasses.dataclass(frozen=True, slots=True)
class KeySet:
    keys: Mapping[str, PublicKey]
    # Why some JWKs were left out (another use, type or curve), for the log.
    skipped: tuple[str, ...] = ()

    def get(self, kid: str) -> PublicKey | None:
        return self.keys.get(kid)

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self.keys)


def parse_jwks(data: str | bytes) -> KeySet:
    """The usable public keys of a JWKS document; ``KeyFileError`` when it is malformed.

    Keys this gateway cannot use but a shared JWKS legitimately holds
    (encryption keys, other key types or curves) are skipped with a reason.
    Anything that looks like a mistake refuses the whole document: keeping
    the previous keys is safer than guessing.
    """
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise KeyFileError(f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyFileError('expected a JSON object {"keys": [...]}')
    keys: dict[str, PublicKey] = {}
    skipped: list[str] = []
    for index, jwk in enumerate(doc["keys"]):
        parsed = _parse_key(index, jwk)
        if isinstance(parsed, str):
            skipped.append(parsed)
            continue
        if parsed.kid in keys:
            raise KeyFileError(f"key id {parsed.kid!r} appears twice")
        keys[parsed.kid] = parsed
    return KeySet(keys, tuple(skipped))


def _parse_key(index: int, jwk: Any) -> PublicKey | str:
    """The key, or why it is skipped."""
    if not isinstance(jwk, dict):
        raise KeyFileError(f"key #{index} is not a JSON object")
    kid = jwk.get("kid")
    label = f"key {kid!r}" if isinstance(kid, str) and kid else f"key #{index}"
    if "d" in jwk:
        # A private key here is published to everyone who can read the file.
        raise KeyFileError(f"{label} holds private key material; publish public keys only")
    use = jwk.get("use", "sig")
    if use != "sig":
        return f"{label}: use is {use!r}, not 'sig'"
    if not isinstance(kid, str) or not kid:
        return f"{label}: no kid, so no token can select it"
    kty = jwk.get("kty")
    if kty == "RSA":
        family: tuple[str, ...] = RSA_ALGORITHMS
    elif kty == "EC":
        crv = jwk.get("crv")
        curve_alg = EC_ALGORITHMS.get(crv) if isinstance(crv, str) else None
        if curve_alg is None:
            return f"{label}: curve {crv!r} is not supported ({', '.join(EC_ALGORITHMS)})"
        family = (curve_alg,)
    else:
        return f"{label}: key type {kty!r} is not used (RSA and EC only; HS uses auth.secret)"
    alg = jwk.get("alg")
    if alg is None:
        algorithms = family
    elif alg in family:
        algorithms = (alg,)
    elif alg in PUBLIC_KEY_ALGORITHMS or alg in HMAC_ALGORITHMS:
        raise KeyFileError(f"{label}: alg {alg} does not fit its key ({', '.join(family)})")
    else:
        return f"{label}: algorithm {alg!r} is not supported"
    try:
        by_algorithm = {a: jwt.PyJWK(jwk, algorithm=a) for a in algorithms}
    except Exception as exc:
        # PyJWT mostly raises InvalidKeyError, but malformed members can
        # surface as other types from its base64 and cryptography calls.
        raise KeyFileError(f"{label} is not a valid {kty} key: {exc}") from exc
    return PublicKey(kid, kty, by_algorithm)


def load_private_key(pem: str, algorithm: str | None = None) -> tuple[SigningKey, str]:
    """The signing key in ``pem`` and the algorithm to use (inferred when None).

    ValueError says what is wrong: not a key, encrypted, or ``algorithm`` not
    fitting the key type (an RSA key signs RS*, a P-256 key only ES256).
    """
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except TypeError as exc:
        raise ValueError("the private key is encrypted; give an unencrypted PEM") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM private key: {exc}") from exc
    family: tuple[str, ...]
    if isinstance(key, rsa.RSAPrivateKey):
        family, what = RSA_ALGORITHMS, "an RSA"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_CURVE_NAMES:
        crv = _EC_CURVE_NAMES[key.curve.name]
        family, what = (EC_ALGORITHMS[crv],), f"an EC {crv}"
    else:
        raise ValueError("only RSA and EC P-256 or P-384 private keys are supported")
    if algorithm is None:
        return key, family[0]
    if algorithm not in family:
        raise ValueError(f"{algorithm} does not fit {what} key (use {', '.join(family)})")
    return key, algorithm


_Stamp = tuple[int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    # The inode catches a file replaced by rename (the recommended way) even
    # when size and the coarse mtime happen to match the old one.
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class KeyStore:
    """The keys of one JWKS file; replaced whole on reload, never by a bad file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._stamp = _stamp(self._path)
        # Raises at start-up: a gateway that would refuse every RS/ES token
        # should not look healthy.
        self._keys = self._read()
        self._log_loaded(self._keys, ())

    @property
    def path(self) -> Path:
        return self._path

    @property
    def kids(self) -> tuple[str, ...]:
        return self._keys.kids

    def get(self, kid: str) -> PublicKey | None:
        return self._keys.get(kid)

    def reload(self) -> bool:
        """Read the file again; False (old keys kept, error logged) when it is unusable."""
        stamp = _stamp(self._path)
        try:
            keys = self._read()
        except KeyFileError as exc:
            # Remember the bad file's stamp so polling logs it once, not every tick.
            self._stamp = stamp
            log.error(
                "key file not loaded; keeping the previous keys",
                path=str(self._path),
                error=str(exc),
                kids=list(self.kids),
            )
            return False
        old = self._keys
        self._stamp = stamp
        self._keys = keys
        self._log_loaded(keys, old.kids)
        return True

    def reload_if_changed(self) -> bool:
        """Reload when the file's inode, size or mtime changed; one stat otherwise."""
        if _stamp(self._path) == self._stamp:
            return False
        return self.reload()

    def _read(self) -> KeySet:
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise KeyFileError(
                f"auth.jwks_file {self._path}: cannot read: {exc.strerror or exc}"
            ) from exc
        try:
            return parse_jwks(data)
        except KeyFileError as exc:
            raise KeyFileError(f"auth.jwks_file {self._path}: {exc}") from exc

    def _log_loaded(self, keys: KeySet, before: tuple[str, ...]) -> None:
        for reason in keys.skipped:
            log.warning("key skipped", path=str(self._path), reason=reason)
        log.info(
            "keys loaded",
            path=str(self._path),
            kids=list(keys.kids),
            added=[k for k in keys.kids if k not in before],
            removed=[k for k in before if k not in keys.keys],
        )
        if not keys.keys:
            log.warning(
                "key file has no usable keys: every RS/ES token is refused", path=str(self._path)
            )
