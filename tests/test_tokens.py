"""RS256/ES256 tokens, keys chosen by kid from a JWKS file, key rotation, minting."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from broker.background import Background
from broker.settings import ConfigError
from gateway import config as gconfig
from gateway.auth import Authenticator, AuthError, mint
from gateway.config import AuthSettings
from gateway.keys import KeyFileError, KeyStore, load_private_key, parse_jwks
from rtgate.natsserver import NatsServer, env_without_rtgate, free_port, wait_for_port
from tests.conftest import (
    SECRET,
    ClientFactory,
    Gateway,
    GatewayFactory,
    refused_handshake,
    token,
)
from tests.wsclient import WsClient

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
ALGORITHMS = ("HS256", "RS256", "ES256")


# -- keys ---------------------------------------------------------------------------
# Session-scoped: RSA key generation is the slow part of these tests.


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="session")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: PrivateKey, kid: str, alg: str | None = "") -> dict[str, Any]:
    """The public JWK of ``key``; ``alg`` "" means the usual one, None leaves it out."""
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        usual = "RS256"
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        usual = "ES256" if key.curve.name == "secp256r1" else "ES384"
    jwk.update(kid=kid, use="sig")
    if alg is not None:
        jwk["alg"] = alg or usual
    return jwk


def write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    # Write and rename, as operators should: the gateway never sees half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"keys": list(keys)}))
    os.replace(tmp, path)


def pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def signed(
    key: PrivateKey, kid: str | None, user: str = "alice", alg: str | None = None, **kwargs: Any
) -> str:
    return mint(AuthSettings(), user, private_key=pem(key), kid=kid, algorithm=alg, **kwargs)


def hs256_signed_with(secret: bytes, kid: str, user: str = "mallory") -> str:
    """An HS256 token made by hand: PyJWT itself refuses PEM keys as HMAC secrets."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps({"sub": user}).encode())
    signing_input = header + b"." + payload
    signature = b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


def public_key_encodings(key: PrivateKey, jwks_file: Path) -> list[bytes]:
    """Every form of the public key an attacker might try as an HMAC secret."""
    public = key.public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    forms = [
        public.public_bytes(serialization.Encoding.PEM, spki),
        public.public_bytes(serialization.Encoding.DER, spki),
        json.dumps(public_jwk(key, "k1")).encode(),
        jwks_file.read_bytes(),
    ]
    if isinstance(public, rsa.RSAPublicKey):
        forms.append(
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        )
    return forms


def settings(path: Path, algorithms: tuple[str, ...] = ALGORITHMS) -> AuthSettings:
    return AuthSettings(secret=SECRET, algorithms=algorithms, jwks_file=str(path))


@pytest.fixture
def jwks(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    """A JWKS file with the RSA key as k1 and the EC key as k2."""
    path = tmp_path / "jwks.json"
    write_jwks(path, public_jwk(rsa_key, "k1"), public_jwk(ec_key, "k2"))
    return path


# -- parsing and key selection ----------------------------------------------------------


def test_key_store_loads_keys_by_kid(jwks: Path) -> None:
    store = KeyStore(jwks)
    assert set(store.kids) == {"k1", "k2"}
    rsa_public, ec_public = store.get("k1"), store.get("k2")
    assert rsa_public is not None and ec_public is not None
    assert rsa_public.kty == "RSA" and set(rsa_public.by_algorithm) == {"RS256"}
    assert ec_public.kty == "EC" and set(ec_public.by_algorithm) == {"ES256"}
    assert store.get("k3") is None


def test_tokens_are_verified_with_the_key_their_kid_names(
    jwks: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    auth = Authenticator(settings(jwks))
    assert auth.verify(signed(rsa_key, "k1", name="Alice")).username == "Alice"
    assert auth.verify(signed(ec_key, "k2", "bob")).user_id == "bob"
    assert auth.verify(token("carol")).user_id == "carol"  # HS256 with the secret stays
    # The right key type under the wrong kid: the signature does not match.
    other = rsa.generate_private_key(65537, 2048)
    with pytest.raises(AuthError, match="signature invalid"):
        auth.verify(signed(other, "k1"))
    with pytest.raises(AuthError, match=r"^unknown key id$"):
        auth.verify(signed(rsa_key, "k9"))
    with pytest.raises(AuthError, match="unknown key id"):
        auth.verify(signed(rsa_key, None))


def test_token_algorithm_must_fit_its_key(
    jwks: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    auth = Authenticator(settings(jwks, ("RS256", "RS384", "ES256")))
    # An RSA token naming the EC key, and the other way round.
    with pytest.raises(AuthError, match="algorithm not accepted for its key"):
        auth.verify(signed(rsa_key, "k2"))
    with pytest.raises(AuthError, match="algorithm not accepted for its key"):
        auth.verify(signed(ec_key, "k1"))
    # The JWK says RS256: RS384 with the same key is refused.
    with pytest.raises(AuthError, match="algorithm not accepted for its key"):
        auth.verify(signed(rsa_key, "k1", alg="RS384"))
    # Not in auth.algorithms at all.
    with pytest.raises(AuthError, match=r"^token algorithm not accepted$"):
        auth.verify(signed(rsa_key, "k1", alg="RS512"))
    hs_off = Authenticator(settings(jwks, ("RS256",)))
    with pytest.raises(AuthError, match=r"^token algorithm not accepted$"):
        hs_off.verify(token("alice"))


def test_rsa_jwk_without_alg_verifies_each_configured_rs_algorithm(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, public_jwk(rsa_key, "k1", alg=None))
    auth = Authenticator(settings(path, ("RS256", "RS512")))
    for alg in ("RS256", "RS512"):
        assert auth.verify(signed(rsa_key, "k1", alg=alg)).user_id == "alice"
    with pytest.raises(AuthError, match=r"^token algorithm not accepted$"):
        auth.verify(signed(rsa_key, "k1", alg="RS384"))


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key"])
def test_algorithm_confusion_public_key_as_hmac_secret_is_refused(
    jwks: Path, key_name: str, request: pytest.FixtureRequest
) -> None:
    key: PrivateKey = request.getfixturevalue(key_name)
    kid = "k1" if key_name == "rsa_key" else "k2"
    with_hs = Authenticator(settings(jwks))
    without_hs = Authenticator(settings(jwks, ("RS256", "ES256")))
    for secret in public_key_encodings(key, jwks):
        forged = hs256_signed_with(secret, kid)
        with pytest.raises(AuthError, match="signature invalid"):
            with_hs.verify(forged)
        with pytest.raises(AuthError, match=r"^token algorithm not accepted$"):
            without_hs.verify(forged)


def test_jwks_rules(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    good = public_jwk(rsa_key, "k1")
    p521 = public_jwk(ec.generate_private_key(ec.SECP521R1()), "k5", alg=None)
    keys = parse_jwks(
        json.dumps(
            {
                "keys": [
                    good,
                    {**public_jwk(ec_key, "enc"), "use": "enc"},
                    {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
                    p521,
                    {k: v for k, v in public_jwk(ec_key, "x").items() if k != "kid"},
                    {**public_jwk(rsa_key, "ps"), "alg": "PS256"},
                ]
            }
        )
    )
    assert keys.kids == ("k1",)
    assert len(keys.skipped) == 5
    bad: list[tuple[Any, str]] = [
        ("{", "not valid JSON"),
        ({"keys": {}}, "expected a JSON object"),
        ([good], "expected a JSON object"),
        ({"keys": [good, good]}, "appears twice"),
        ({"keys": ["k1"]}, "not a JSON object"),
        ({"keys": [{**good, "d": "AAAA"}]}, "private key material"),
        ({"keys": [{**public_jwk(ec_key, "k2"), "alg": "ES384"}]}, "does not fit"),
        ({"keys": [{**public_jwk(rsa_key, "k3"), "alg": "ES256"}]}, "does not fit"),
        ({"keys": [{**good, "n": "!!!"}]}, "not a valid RSA key"),
    ]
    for doc, message in bad:
        with pytest.raises(KeyFileError, match=message):
            parse_jwks(doc if isinstance(doc, str) else json.dumps(doc))
    # An empty set is valid: it revokes every key.
    assert parse_jwks('{"keys": []}').kids == ()


def test_missing_or_bad_key_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Authenticator(settings(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(KeyFileError, match=r"auth\.jwks_file .*bad\.json: not valid JSON"):
        KeyStore(bad)


def test_auth_settings_rules(tmp_path: Path) -> None:
    for kwargs, message in [
        ({"algorithms": ("RS256",)}, "auth.jwks_file must be set"),
        ({"jwks_file": "k.json"}, "no RS or ES algorithm"),
        ({"algorithms": ("HS256",), "secret": ""}, "auth.secret must not be empty"),
        ({"algorithms": ("PS256",), "jwks_file": "k.json"}, "PS256 is not supported"),
        ({"algorithms": ("ES512",), "jwks_file": "k.json"}, "ES512 is not supported"),
        (
            {"algorithms": ("RS256",), "jwks_file": "k.json", "jwks_check_seconds": -1},
            "jwks_check_seconds",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            AuthSettings(**kwargs)
    # Public keys only: no secret needed.
    AuthSettings(secret="", algorithms=("RS256", "ES256"), jwks_file="k.json")
    loaded = gconfig.load(
        env={
            "RTGATE_AUTH__ALGORITHMS": "RS256,ES256",
            "RTGATE_AUTH__JWKS_FILE": "/etc/rtgate/jwks.json",
            "RTGATE_AUTH__JWKS_CHECK_SECONDS": "0",
        }
    )
    assert loaded.auth.algorithms == ("RS256", "ES256")
    assert loaded.auth.jwks_check_seconds == 0.0
    with pytest.raises(ConfigError, match=r"auth\.jwks_file must be set"):
        gconfig.load(env={"RTGATE_AUTH__ALGORITHMS": "RS256"})


# -- reloading --------------------------------------------------------------------------


def test_reload_if_changed_picks_up_a_rewritten_file(
    jwks: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    store = KeyStore(jwks)
    assert store.reload_if_changed() is False  # unchanged: one stat, no read
    write_jwks(jwks, public_jwk(rsa_key, "k1"), public_jwk(rsa_key2, "k3"))
    assert store.reload_if_changed() is True
    assert set(store.kids) == {"k1", "k3"}
    assert store.reload_if_changed() is False
    assert store.reload() is True  # SIGHUP: read even when unchanged


def test_bad_file_keeps_the_old_keys(jwks: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(settings(jwks))
    store = auth.keys
    assert store is not None
    for breakage in ("truncated", "private", "deleted"):
        if breakage == "truncated":
            jwks.write_text('{"keys": [')
        elif breakage == "private":
            write_jwks(jwks, {**public_jwk(rsa_key, "k1"), "d": "AAAA"})
        else:
            jwks.unlink()
        with structlog.testing.capture_logs() as logs:
            assert store.reload_if_changed() is False
            # The same bad file is reported once, not on every poll.
            assert store.reload_if_changed() is False
            assert auth.reload_keys() is False
        errors = [e for e in logs if e["log_level"] == "error"]
        assert len(errors) == 2, breakage
        assert set(store.kids) == {"k1", "k2"}
        assert auth.verify(signed(rsa_key, "k1")).user_id == "alice"
    write_jwks(jwks, public_jwk(rsa_key, "k7"))
    assert store.reload_if_changed() is True
    assert store.kids == ("k7",)


async def test_watch_keys_polls_until_stopped(jwks: Path, rsa_key2: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(settings(jwks))
    background = Background()
    watcher = background.spawn(auth.watch_keys(background, 0.02))
    write_jwks(jwks, public_jwk(rsa_key2, "k3"))
    async with asyncio.timeout(5):
        while auth.keys is not None and auth.keys.get("k3") is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert auth.verify(signed(rsa_key2, "k3")).user_id == "alice"
    await background.stop()
    assert watcher.done()
    # Nothing to watch, or polling off: returns at once.
    await asyncio.wait_for(Authenticator(AuthSettings()).watch_keys(Background(), 1), 1)
    await asyncio.wait_for(auth.watch_keys(Background(), 0), 1)


# -- minting ----------------------------------------------------------------------------


def test_mint_infers_the_algorithm_from_the_key(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    for key, alg in [(rsa_key, "RS256"), (ec_key, "ES256"), (p384, "ES384")]:
        tok = signed(key, "k1")
        assert jwt.get_unverified_header(tok) == {"alg": alg, "typ": "JWT", "kid": "k1"}
        assert jwt.decode(tok, key.public_key(), algorithms=[alg])["sub"] == "alice"
    assert jwt.get_unverified_header(signed(rsa_key, None, alg="RS512"))["alg"] == "RS512"
    for key, alg in [(rsa_key, "ES256"), (ec_key, "RS256"), (ec_key, "ES384"), (rsa_key, "HS256")]:
        with pytest.raises(ValueError, match="does not fit"):
            signed(key, "k1", alg=alg)
    encrypted = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    ).decode()
    with pytest.raises(ValueError, match="encrypted"):
        load_private_key(encrypted)
    with pytest.raises(ValueError, match="not a PEM private key"):
        load_private_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    # Without a key: HS, the first HS algorithm configured, as before.
    hs = mint(
        AuthSettings(secret="s" * 48, algorithms=("RS256", "HS384"), jwks_file="k"), "a", kid="h1"
    )
    assert jwt.get_unverified_header(hs) == {"alg": "HS384", "typ": "JWT", "kid": "h1"}
    with pytest.raises(ValueError, match="no HS algorithm"):
        mint(AuthSettings(algorithms=("RS256",), jwks_file="k"), "a")
    with pytest.raises(ValueError, match="RS256 needs a private key"):
        mint(AuthSettings(), "a", algorithm="RS256")


@pytest.mark.parametrize("key_name, alg", [("rsa_key", "RS256"), ("ec_key", "ES256")])
def test_token_command_signs_with_a_private_key(
    tmp_path: Path, key_name: str, alg: str, request: pytest.FixtureRequest
) -> None:
    key: PrivateKey = request.getfixturevalue(key_name)
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem(key))
    cli = [
        sys.executable,
        "-m",
        "rtgate.cli",
        "token",
        "--user",
        "a",
        "--private-key",
        str(key_file),
    ]
    out = subprocess.run(
        [*cli, "--kid", "k1"],
        env=env_without_rtgate({}),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    assert jwt.get_unverified_header(out) == {"alg": alg, "typ": "JWT", "kid": "k1"}
    assert jwt.decode(out, key.public_key(), algorithms=[alg])["sub"] == "a"
    wrong = "ES256" if alg == "RS256" else "RS256"
    result = subprocess.run(
        [*cli, "--alg", wrong],
        env=env_without_rtgate({}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "does not fit" in result.stderr


def test_gateway_with_unreadable_key_file_exits_2(tmp_path: Path) -> None:
    env = env_without_rtgate(
        {"RTGATE_AUTH__ALGORITHMS": "RS256", "RTGATE_AUTH__JWKS_FILE": str(tmp_path / "nope.json")}
    )
    result = subprocess.run(
        [sys.executable, "-m", "rtgate.cli", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "auth.jwks_file" in result.stderr and "nope.json" in result.stderr


# -- against a real gateway ----------------------------------------------------------------


async def _gateway(make_gateway: GatewayFactory, path: Path) -> Gateway:
    return await make_gateway(auth={"jwks_file": str(path), "algorithms": ALGORITHMS})


async def test_rs256_and_es256_tokens_connect(
    make_gateway: GatewayFactory,
    connect: ClientFactory,
    jwks: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    gw = await _gateway(make_gateway, jwks)
    rs = await connect(gw, token_=signed(rsa_key, "k1", "alice", name="Alice"), welcome=False)
    assert (await rs.next("welcome"))["data"]["username"] == "Alice"
    es = await connect(gw, token_=signed(ec_key, "k2", "bob"), welcome=False)
    assert (await es.next("welcome"))["data"]["userId"] == "bob"
    await connect(gw, "carol")  # HS256 with the shared secret still works
    for client in (rs, es):
        await client.ok("room:join", "lobby")
    await rs.ok("chat:message", {"roomId": "lobby", "content": "signed with RSA"})
    got = (await es.next("chat:message"))["data"]
    assert got["userId"] == "alice" and got["content"] == "signed with RSA"
    # The auth frame takes them too.
    late = await WsClient.connect(gw.url)
    try:
        data = await late.ok("auth", {"token": signed(ec_key, "k2", "dave")})
        assert data["userId"] == "dave"
    finally:
        await late.close()


async def test_unknown_kid_and_confused_algorithm_get_401_json(
    make_gateway: GatewayFactory, jwks: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    gw = await _gateway(make_gateway, jwks)
    for tok, message in [
        (signed(rsa_key, "nope"), "unknown key id"),
        (signed(rsa_key, None), "unknown key id"),
        (signed(rsa_key, "k2"), "token algorithm not accepted for its key"),
        (
            hs256_signed_with(public_key_encodings(rsa_key, jwks)[0], "k1"),
            "token signature invalid",
        ),
    ]:
        status, body = await refused_handshake(gw, {"token": tok})
        assert status == 401
        assert body["error"]["code"] == "unauthenticated"
        assert message in body["error"]["message"]
    client = await WsClient.connect(gw.url)
    try:
        await client.send("auth", {"token": signed(rsa_key, "nope")}, id=1)
        assert await client.wait_closed() == 4401
    finally:
        await client.close()


async def test_key_rotated_while_running(
    make_gateway: GatewayFactory,
    connect: ClientFactory,
    jwks: Path,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key2: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    gw = await _gateway(make_gateway, jwks)
    auth = gw.node.auth
    await connect(gw, token_=signed(rsa_key, "k1"))
    assert (await refused_handshake(gw, {"token": signed(rsa_key2, "k3")}))[0] == 401

    # Rotate: k3 in, k1 out (as SIGHUP would).
    write_jwks(jwks, public_jwk(rsa_key2, "k3"), public_jwk(ec_key, "k2"))
    assert auth.reload_keys() is True
    await connect(gw, "bob", token_=signed(rsa_key2, "k3", "bob"))
    status, body = await refused_handshake(gw, {"token": signed(rsa_key, "k1")})
    assert status == 401 and body["error"]["message"] == "unknown key id"

    # Rotate again, picked up by polling: k1 back, k3 out.
    write_jwks(jwks, public_jwk(rsa_key, "k1"), public_jwk(ec_key, "k2"))
    assert auth.keys is not None
    assert auth.keys.reload_if_changed() is True
    assert auth.keys.reload_if_changed() is False
    await connect(gw, token_=signed(rsa_key, "k1"))
    assert (await refused_handshake(gw, {"token": signed(rsa_key2, "k3", "bob")}))[0] == 401

    # A broken file changes nothing.
    jwks.write_text("{")  # noqa: ASYNC240
    assert auth.keys.reload_if_changed() is False
    await connect(gw, token_=signed(rsa_key, "k1"))
    await connect(gw, token_=signed(ec_key, "k2"))


def test_sighup_reloads_keys_in_a_running_gateway(
    tmp_path: Path, nats_server: NatsServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, public_jwk(rsa_key, "k1", "RS256"))
    port = free_port()
    env = env_without_rtgate(
        {
            "RTGATE_NATS__URLS": nats_server.url,
            "RTGATE_SERVER__PORT": str(port),
            "RTGATE_AUTH__ALGORITHMS": "RS256",
            "RTGATE_AUTH__JWKS_FILE": str(path),
            # No polling: only the signal can make the gateway see the new key.
            "RTGATE_AUTH__JWKS_CHECK_SECONDS": "0",
            "RTGATE_LOG__LEVEL": "warning",
        }
    )
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        wait_for_port("127.0.0.1", port, 20, proc)

        async def status(tok: str) -> int:
            try:
                async with websockets.connect(f"{url}?token={tok}") as ws:
                    await ws.recv()
                    return 101
            except websockets.InvalidStatus as exc:
                return exc.response.status_code

        assert asyncio.run(status(signed(rsa_key, "k1"))) == 101
        write_jwks(path, public_jwk(rsa_key2, "k2", "RS256"))
        assert asyncio.run(status(signed(rsa_key2, "k2"))) == 401
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while asyncio.run(status(signed(rsa_key2, "k2"))) != 101:
            assert time.monotonic() < deadline, "SIGHUP did not reload the keys"
        assert asyncio.run(status(signed(rsa_key, "k1"))) == 401
    finally:
        proc.terminate()
        proc.wait(20)
