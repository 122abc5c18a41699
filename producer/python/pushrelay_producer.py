"""Publish push messages to RabbitMQ the way the pushrelay frontends expect them.

This is the Python twin of the Go package ``sidecar/producer`` (README.md,
"Message contract" and "Shards and the producer side"), for the web tier's
Django processes. It needs Python 3.11 and pika 1.x (Debian's
``python3-pika``) and nothing else, so it can be copied into a project as one
file.

The Publisher declares nothing: the exchange belongs to the relays'
deployment, and a producer that declared it with other arguments would break
the relays' declaration (or the other way round).

Validation follows the relay's own rules, so that a message the relay would
dead-letter is refused here, where the caller can still do something about
it, instead of being lost quietly downstream. The shared table
``producer/testdata/cases.json`` holds the cases both this module and the Go
producer must agree on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Union

import pika
import pika.exceptions

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_SHARD_COUNT",
    "MAX_CHANNEL_LEN",
    "MAX_SHARD_COUNT",
    "InvalidMessage",
    "Message",
    "Publisher",
    "Unroutable",
    "check_channel",
    "routing_key",
    "shard",
    "validate",
]

#: The relays' default ``push.max_body``. Larger bodies are dead-lettered by
#: the relay, so the Publisher refuses them.
DEFAULT_MAX_BODY = 32 * 1024

#: The relays' default ``shards.count``. Every producer must use the count
#: the frontends' shard map uses.
DEFAULT_SHARD_COUNT = 1024

#: Push Stream's ``push_stream_max_channel_id_length`` and Nchan's
#: ``nchan_max_channel_id_length`` in the shipped Nginx config.
MAX_CHANNEL_LEN = 200

#: Largest shard count: the routing key must stay a short decimal, and the
#: Go side (``shard.MaxCount``) refuses more.
MAX_SHARD_COUNT = 1 << 16

# AMQP's limit on a short string: message_id, type and content_type.
_MAX_SHORT_STRING = 255

# The channel id alphabet. A set of str rather than str.isalnum() and friends:
# those accept fullwidth digits, the Kelvin sign and other non-ASCII letters,
# which the relay refuses.
_CHANNEL_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:@-"
)

# AMQP delivery mode 2: the broker writes the message to disk (pika 1.2 has
# no name for it).
_PERSISTENT = 2


class InvalidMessage(ValueError):
    """The message breaks the contract; retrying it cannot succeed.

    ``reason`` is the relay's dead-letter reason for the first rule broken
    (``no_channel``, ``invalid_channel``, ``reserved_channel``,
    ``body_too_large`` or ``invalid_header``): what the relay would have
    written in ``x-pushrelay-reason`` had the message reached it.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"invalid message ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class Unroutable(Exception):
    """No frontend's queue is bound to the message's shard, so the broker
    returned it: the message reached nobody.

    A shard map with a gap, or a frontend whose bindings are gone. Retry
    later, alert, or send such messages to an alternate exchange by policy
    (README.md, "Go").
    """


Body = Union[bytes, bytearray, memoryview, str]


@dataclasses.dataclass(frozen=True)
class Message:
    """One push to the browsers subscribed to ``channel``.

    ``body`` is sent byte for byte; a str is sent as its UTF-8 bytes (and its
    size is counted in bytes). ``type`` becomes the browser's event type,
    ``id`` the event id (AMQP ``message_id``); empty means absent.
    """

    channel: str
    body: Body = b""
    type: str = ""
    id: str = ""
    content_type: str = ""


def shard(channel: str, count: int = DEFAULT_SHARD_COUNT) -> int:
    """The pushrelay shard of a channel id: FNV-1a-32 of its UTF-8 bytes, mod count.

    The shard is part of the message contract: every producer, in any
    language, must compute it this way (``shared/contract/shard-vectors.tsv``
    pins it).
    """
    if count < 1:
        raise ValueError(f"shard count must be positive, got {count}")
    h = 0x811C9DC5
    for byte in channel.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % count


def routing_key(channel: str, count: int = DEFAULT_SHARD_COUNT) -> str:
    """The routing key of a message for channel: its shard in decimal."""
    return str(shard(channel, count))


def check_channel(channel: object) -> None:
    """Apply the relay's channel id rules (Go: ``message.CheckChannel``).

    1-200 bytes of ``[A-Za-z0-9_.:@-]``, not exactly ``ALL`` (Push Stream's
    reserved id) and not ending in ``.b`` and digits (Push Stream would strip
    that as a backtrack request and publish to another channel). With this
    alphabet no escaping is needed in either publisher dialect.
    """
    if channel is None or channel == "":
        raise InvalidMessage("no_channel", "channel is empty")
    if not isinstance(channel, str):
        # The relay refuses a channel header that is not an AMQP string.
        raise InvalidMessage(
            "invalid_channel", f"channel must be a str, got {type(channel).__name__}"
        )
    try:
        size = len(channel.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: not sendable at all
        size = len(channel)
    if size > MAX_CHANNEL_LEN:
        raise InvalidMessage(
            "invalid_channel", f"channel is {size} bytes, longer than {MAX_CHANNEL_LEN}"
        )
    for i, c in enumerate(channel):
        if c not in _CHANNEL_CHARS:
            raise InvalidMessage(
                "invalid_channel",
                f"channel {channel!r}: character {c!r} at index {i} is not one of "
                "A-Z a-z 0-9 _ . : @ -",
            )
    if channel == "ALL":
        raise InvalidMessage("reserved_channel", 'channel "ALL" is reserved by Push Stream')
    stem = channel.rstrip("0123456789")
    if len(stem) < len(channel) and stem.endswith(".b"):
        raise InvalidMessage(
            "reserved_channel",
            f"channel {channel!r} ends in .b and digits, which Push Stream reads as a "
            "backtrack request",
        )


def _body_bytes(body: object) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if body is None:
        return b""
    raise TypeError(f"body must be bytes or str, got {type(body).__name__}")


def _check_property(name: str, value: object) -> None:
    """Refuse what must not reach an HTTP header on the relay's side (a CR or
    LF would inject headers) and what AMQP cannot carry (more than 255 bytes).

    Like the Go producer, this refuses every control character, tab
    included, although the relay lets a tab through.
    """
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidMessage("invalid_header", f"{name} must be a str, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidMessage("invalid_header", f"{name} {value!r} is not encodable as UTF-8") from None
    if size > _MAX_SHORT_STRING:
        raise InvalidMessage(
            "invalid_header", f"{name} is {size} bytes, longer than {_MAX_SHORT_STRING}"
        )
    for i, c in enumerate(value):
        # On characters, not bytes: UTF-8 encodes everything above U+007F in
        # bytes >= 0x80, so this is the same test as the Go producer's.
        if c < " " or c == "\x7f":
            raise InvalidMessage(
                "invalid_header", f"{name} {value!r}: control character at index {i}"
            )


def validate(message: Message, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Raise InvalidMessage if the relay would dead-letter message.

    The rules are checked in the relay's order (channel, body, then type,
    message id and content type), so ``reason`` is the one the relay would
    have given.
    """
    check_channel(message.channel)
    size = len(_body_bytes(message.body))
    if size > max_body:
        raise InvalidMessage("body_too_large", f"body is {size} bytes, larger than {max_body}")
    _check_property("type", message.type)
    _check_property("message id", message.id)
    _check_property("content type", message.content_type)


class Publisher:
    """Publishes Messages on one AMQP channel in confirm mode.

    ``publish`` returns only once the broker has confirmed the message, with
    ``mandatory`` set so that a message for a shard no queue is bound to
    comes back as Unroutable instead of being confirmed and dropped.

    pika's BlockingConnection is not thread-safe: use one Publisher per
    thread, and in a pre-forking server (gunicorn, uWSGI) create it after the
    fork, lazily on first use.

    Given a URL (or pika connection parameters), the Publisher owns its
    connection: ``close`` ends it, and a connection found dead before a
    publish (the broker restarted, or dropped an idle web process that
    missed heartbeats) is redialled, since nothing was sent on it yet. Given
    a ``connection``, it is the caller's: never closed, never redialled.
    After a channel error (a missing exchange, say) the next publish opens a
    new channel.
    """

    def __init__(
        self,
        url: Union[str, pika.connection.Parameters, None] = None,
        exchange: str = "pushrelay",
        count: int = DEFAULT_SHARD_COUNT,
        *,
        connection: Optional[pika.BlockingConnection] = None,
        max_body: int = DEFAULT_MAX_BODY,
    ):
        if (url is None) == (connection is None):
            raise ValueError("give exactly one of url and connection")
        if not exchange:
            # The default exchange routes by queue name, not by shard.
            raise ValueError("exchange must not be empty")
        if not 1 <= count <= MAX_SHARD_COUNT:
            raise ValueError(f"shard count must be 1..{MAX_SHARD_COUNT}, got {count}")
        if max_body < 1:
            raise ValueError(f"max body must be positive, got {max_body}")
        self.exchange = exchange
        self.count = count
        self.max_body = max_body
        if isinstance(url, str):
            url = pika.URLParameters(url)
            if url.client_properties is None:
                url.client_properties = {"connection_name": "pushrelay producer (Python)"}
        self._params = url
        self._owns = connection is None
        self._conn = connection if connection is not None else pika.BlockingConnection(url)
        self._chan = None
        self._closed = False
        # Open the channel at once so that a broker refusal shows here.
        self._channel()

    def _channel(self):
        """The open channel, redialling or reopening what the broker closed."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if self._owns and self._conn.is_open:
            try:
                # Reads what the broker sent while we were idle: a close
                # shows here, before anything is published on it.
                self._conn.process_data_events(time_limit=0)
            except pika.exceptions.AMQPConnectionError:
                pass
        if not self._conn.is_open:
            if not self._owns:
                raise pika.exceptions.ConnectionWrongStateError("AMQP connection is closed")
            self._conn = pika.BlockingConnection(self._params)
            self._chan = None
        if self._chan is None or not self._chan.is_open:
            chan = self._conn.channel()
            chan.confirm_delivery()
            self._chan = chan
        return self._chan

    def publish(self, message: Message) -> None:
        """Send message to the shard of its channel; return once the broker
        has confirmed it.

        Raises InvalidMessage (nothing was sent; retrying cannot help) or
        Unroutable (no queue is bound to the shard). Any other error (pika's
        ChannelClosedByBroker for a missing exchange, NackError, a lost
        connection) leaves the outcome unknown, and retrying may deliver
        twice, which the relay's at-least-once contract allows.
        """
        validate(message, self.max_body)
        body = _body_bytes(message.body)
        key = routing_key(message.channel, self.count)
        chan = self._channel()
        props = pika.BasicProperties(
            headers={
                "channel": message.channel,
                # Unix microseconds; above 2**31, so pika sends an int64.
                "published_at": time.time_ns() // 1000,
            },
            content_type=message.content_type or None,
            delivery_mode=_PERSISTENT,
            message_id=message.id or None,
            type=message.type or None,
        )
        try:
            chan.basic_publish(self.exchange, key, body, props, mandatory=True)
        except pika.exceptions.UnroutableError as e:
            raise Unroutable(
                f"exchange {self.exchange!r}, key {key} (channel {message.channel!r}): "
                "no frontend's queue is bound to the shard"
            ) from e

    def close(self) -> None:
        """Close the channel, and the connection if the Publisher owns it."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._chan is not None and self._chan.is_open:
                self._chan.close()
        finally:
            self._chan = None
            if self._owns and self._conn.is_open:
                self._conn.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
