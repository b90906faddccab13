"""comms over Redis (docs/redis.md, docs/wire.md "Redis"): an inbox stream per node read through
the consumer group `comms`, topics on pub/sub channels carrying wire-encoded envelopes."""

import json
import time

import redis

from . import topics
from .transport import Delivery
from .wire import Envelope, KIND_CODES, WireError, decode_envelope, encode_envelope, id_hex, parse_id

GROUP = "comms"


class RedisTransport:
    """Point to point, topics and acknowledgements through one Redis server."""

    name = "redis"

    def __init__(self, node_id: str, url: str = "redis://127.0.0.1:6379", prefix: str = "comms",
                 consumer: str = "python"):
        self.node_id = node_id
        self.prefix = prefix
        self.consumer = consumer
        self.redis = redis.Redis.from_url(url)
        self.address = self.address_of(node_id)
        self.pubsub = None
        self.patterns = set()
        try:
            self.redis.xgroup_create(self.address, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def address_of(self, node_id: str) -> str:
        return "%s:inbox:%s" % (self.prefix, node_id)

    def send(self, address: str, envelope: Envelope) -> None:
        fields = {"v": "1", "id": id_hex(envelope.id), "from": envelope.sender}
        if not (envelope.to_kind == "node" and address == self.address_of(envelope.to)):
            fields["to_kind"] = envelope.to_kind
            fields["to"] = envelope.to
        if envelope.correlation_id is not None:
            fields["correlation_id"] = id_hex(envelope.correlation_id)
        if envelope.headers:
            fields["headers"] = json.dumps([list(pair) for pair in envelope.headers])
        fields["payload"] = envelope.payload
        # NOMKSTREAM: a typo'd address fails instead of creating an inbox nobody reads.
        if self.redis.xadd(address, fields, nomkstream=True) is None:
            raise ConnectionError("no inbox %s: no comms node with that id and prefix ever started" % address)

    def publish(self, envelope: Envelope) -> None:
        self.redis.publish("%s:topic:%s" % (self.prefix, envelope.to), encode_envelope(envelope))

    def subscribe(self, pattern: str) -> None:
        if self.pubsub is None:
            self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        glob = "%s:topic:%s" % (_escape(self.prefix), ".".join(
            "*" if segment in ("*", ">") else _escape(segment) for segment in pattern.split(".")))
        self.pubsub.psubscribe(glob)
        self.patterns.add(pattern)
        # Wait for Redis to confirm: a publication sent after this returns is received.
        deadline = time.monotonic() + 5
        while not self.pubsub.subscribed and time.monotonic() < deadline:
            self.pubsub.get_message(timeout=0.05)

    def receive(self, timeout: float):
        """Messages that arrived within `timeout` seconds, each to be acknowledged."""
        deliveries = []
        if self.pubsub is not None:
            while True:
                message = self.pubsub.get_message(timeout=0)
                if message is None:
                    break
                if message["type"] != "pmessage":
                    continue
                channel = message["channel"].decode()
                topic = channel[len("%s:topic:" % self.prefix):]
                # Redis' glob `*` also matches dots: check the exact comms rule.
                if not any(topics.matches(pattern, topic) for pattern in self.patterns):
                    continue
                try:
                    deliveries.append(Delivery(decode_envelope(message["data"]), lambda: None))
                except WireError:
                    continue
            if deliveries:
                return deliveries
        block = max(1, int(min(timeout, 0.1) * 1000))
        reply = self.redis.xreadgroup(GROUP, self.consumer, {self.address: ">"}, count=64, block=block)
        for _stream, entries in reply or []:
            for entry_id, raw in entries:
                fields = {key.decode(): value for key, value in raw.items()}
                try:
                    envelope = _decode_entry(fields, self.node_id)
                except (WireError, ValueError, KeyError) as error:
                    # As comms does: a malformed entry goes to the dead-letter stream.
                    self.redis.xadd(self.address + ":dead-letter", {"reason": str(error), **raw})
                    self._settle(entry_id)
                    continue
                deliveries.append(Delivery(envelope, lambda entry_id=entry_id: self._settle(entry_id)))
        return deliveries

    def _settle(self, entry_id) -> None:
        self.redis.xack(self.address, GROUP, entry_id)
        self.redis.xdel(self.address, entry_id)

    def close(self, delete_inbox: bool = False) -> None:
        if self.pubsub is not None:
            self.pubsub.close()
        if delete_inbox:
            self.redis.delete(self.address)
        self.redis.close()


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _decode_entry(fields, inbox_node: str) -> Envelope:
    def text(name, default=None):
        return fields[name].decode("utf-8") if name in fields else default

    for required in ("id", "from", "payload"):
        if required not in fields:
            raise WireError("field `%s` is missing" % required)
    if text("v", "1") != "1":
        raise WireError("format version %s is not 1" % text("v"))
    kind = text("to_kind", "node")
    if kind not in KIND_CODES:
        raise WireError("unknown to_kind %r" % kind)
    correlation = text("correlation_id")
    return Envelope(
        id=parse_id(text("id")),
        sender=text("from"),
        to_kind=kind,
        to=text("to", inbox_node),
        payload=fields["payload"],
        correlation_id=parse_id(correlation) if correlation else None,
        headers=[tuple(pair) for pair in json.loads(text("headers", "[]"))],
    )
