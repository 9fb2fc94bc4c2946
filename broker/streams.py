"""Stream definitions and idempotent provisioning.

Whichever service starts first creates the streams; the others find them and
bring their configuration up to date. Each stream stores what clients send
and, in the same step, republishes it to a live core subject with
``Nats-Sequence`` and ``Nats-Last-Sequence`` headers: gateways never need a
consumer per room to fan out.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import NotFoundError

from broker import subjects
from broker.settings import StreamSettings


class StreamError(RuntimeError):
    """A stream could not be provisioned; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    republish_src: str
    republish_dest: str
    max_bytes: int


def specs(settings: StreamSettings) -> tuple[StreamSpec, ...]:
    return (
        StreamSpec(
            subjects.ROOMS_STREAM,
            (subjects.ROOM_PREFIX + "*",),
            subjects.ROOM_PREFIX + "*",
            subjects.LIVE_ROOM_PREFIX + "{{wildcard(1)}}",
            settings.rooms_max_bytes,
        ),
        StreamSpec(
            subjects.DIRECT_STREAM,
            (subjects.DIRECT_PREFIX + "*",),
            subjects.DIRECT_PREFIX + "*",
            subjects.LIVE_DIRECT_PREFIX + "{{wildcard(1)}}",
            settings.direct_max_bytes,
        ),
        StreamSpec(
            subjects.GLOBAL_STREAM,
            (subjects.GLOBAL_SUBJECT,),
            subjects.GLOBAL_SUBJECT,
            subjects.LIVE_GLOBAL_SUBJECT,
            settings.global_max_bytes,
        ),
    )


def stream_config(spec: StreamSpec, settings: StreamSettings) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        # "new": a full stream refuses publishes rather than deleting messages
        # the broker may not have stored yet. No per-subject cap for the same
        # reason; the broker purges what it has persisted.
        discard=DiscardPolicy.NEW,
        max_bytes=spec.max_bytes,
        max_age=settings.max_age_seconds,
        max_msgs=-1,
        max_msgs_per_subject=-1,
        duplicate_window=settings.duplicate_window_seconds,
        num_replicas=settings.replicas,
        allow_direct=True,
        republish=RePublish(src=spec.republish_src, dest=spec.republish_dest),
    )


async def ensure_streams(js: JetStreamContext, settings: StreamSettings) -> dict[str, StreamInfo]:
    """Create or update every stream; return their current info by name."""
    infos: dict[str, StreamInfo] = {}
    for spec in specs(settings):
        config = stream_config(spec, settings)
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            try:
                infos[spec.name] = await js.add_stream(config)
                continue
            except Exception as exc:
                # Another service may have created it between our look-up and our
                # add; if not, the add's own error is the one worth reporting.
                try:
                    await js.stream_info(spec.name)
                except NotFoundError:
                    raise StreamError(f"cannot create stream {spec.name}: {exc}") from exc
        try:
            infos[spec.name] = await js.update_stream(config)
        except Exception as exc:
            raise StreamError(
                f"cannot update stream {spec.name} to this configuration "
                f"(some settings, like replicas or storage, cannot change "
                f"in place): {exc}"
            ) from exc
    return infos


def epoch_of(info: StreamInfo) -> str:
    """A stream incarnation's epoch: its creation time in microseconds.

    A stream deleted and created again gets a new epoch, so offsets from the
    old one are never mistaken for offsets in the new one.
    """
    created = info.created
    if created is None:
        raise RuntimeError(f"stream {info.config.name} reports no creation time")
    return str(int(created.timestamp() * 1_000_000))


def direct_get_request(**fields: Any) -> bytes:
    """Payload for ``$JS.API.DIRECT.GET.<stream>`` (last_by_subj, seq, next_by_subj, batch)."""
    return json.dumps(fields, separators=(",", ":")).encode()


def direct_get_subject(stream: str) -> str:
    return f"$JS.API.DIRECT.GET.{stream}"
