"""comms over RabbitMQ / AMQP 0-9-1 (docs/amqp.md, docs/wire.md "AMQP"): a durable inbox queue per
node on the default exchange, topics on the topic exchange `comms.topics`. The envelope travels
as AMQP properties and headers around the payload (not in the binary wire encoding)."""

import collections

import pika

from .transport import Delivery
from .wire import Envelope, KIND_CODES, WireError, id_hex, parse_id

QUEUE_PREFIX = "comms.inbox."
TOPIC_EXCHANGE = "comms.topics"


class AmqpTransport:
    """Point to point, topics and acknowledgements through one AMQP broker."""

    name = "amqp"

    def __init__(self, node_id: str, url: str = "amqp://guest:guest@127.0.0.1:5672/%2f",
                 queue_prefix: str = QUEUE_PREFIX, topic_exchange: str = TOPIC_EXCHANGE,
                 inbox_expires_ms=None):
        self.node_id = node_id
        self.queue_prefix = queue_prefix
        self.topic_exchange = topic_exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        # Confirms: a send returns once the broker has the message; unroutable ones raise.
        self.channel.confirm_delivery()
        self.address = self.address_of(node_id)
        arguments = {"x-expires": inbox_expires_ms} if inbox_expires_ms else None
        self.channel.queue_declare(queue=self.address, durable=True, arguments=arguments)
        self.channel.exchange_declare(exchange=topic_exchange, exchange_type="topic", durable=True)
        self.arrived = collections.deque()
        self.channel.basic_consume(self.address, self._on_message)
        self.topic_queue = None

    def address_of(self, node_id: str) -> str:
        return self.queue_prefix + node_id

    def _properties(self, envelope: Envelope) -> pika.BasicProperties:
        headers = {
            "comms-from": envelope.sender,
            "comms-to-kind": envelope.to_kind,
            "comms-to": envelope.to,
            "comms-headers": [[name, value] for name, value in envelope.headers],
        }
        return pika.BasicProperties(
            message_id=id_hex(envelope.id),
            correlation_id=id_hex(envelope.correlation_id) if envelope.correlation_id is not None else None,
            reply_to=self.address,
            content_type=envelope.header("content-type"),
            delivery_mode=2,
            headers=headers,
        )

    def send(self, address: str, envelope: Envelope) -> None:
        # mandatory: a queue that does not exist is an error (pika raises UnroutableError).
        self.channel.basic_publish(exchange="", routing_key=address, body=envelope.payload,
                                   properties=self._properties(envelope), mandatory=True)

    def publish(self, envelope: Envelope) -> None:
        self.channel.basic_publish(exchange=self.topic_exchange, routing_key=envelope.to,
                                   body=envelope.payload, properties=self._properties(envelope))

    def subscribe(self, pattern: str) -> None:
        if self.topic_queue is None:
            declared = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
            self.topic_queue = declared.method.queue
            self.channel.basic_consume(self.topic_queue, self._on_message)
        segments = pattern.split(".")
        # `>` (one or more segments) is `*.#` in AMQP, whose `#` alone also matches none.
        key = ".".join(segments[:-1] + ["*.#"] if segments[-1] == ">" else segments)
        self.channel.queue_bind(self.topic_queue, self.topic_exchange, routing_key=key)

    def _on_message(self, channel, method, properties, body):
        self.arrived.append((method, properties, body))

    def receive(self, timeout: float):
        if not self.arrived:
            self.connection.process_data_events(time_limit=min(timeout, 0.1))
        deliveries = []
        while self.arrived:
            method, properties, body = self.arrived.popleft()
            try:
                envelope = _envelope(properties, body, self.node_id, method.routing_key,
                                     method.exchange == self.topic_exchange)
            except (WireError, ValueError) as error:
                # As comms does: refused for good (dead-lettered if the queue has a DLX).
                self.channel.basic_reject(method.delivery_tag, requeue=False)
                continue
            tag = method.delivery_tag
            deliveries.append(Delivery(envelope, lambda tag=tag: self.channel.basic_ack(tag)))
        return deliveries

    def close(self, delete_inbox: bool = False) -> None:
        if delete_inbox:
            self.channel.queue_delete(self.address)
        self.connection.close()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _envelope(properties, body: bytes, node_id: str, routing_key: str, from_topic: bool) -> Envelope:
    if not properties.message_id:
        raise WireError("the message has no message_id property")
    headers = properties.headers or {}
    kind = _text(headers.get("comms-to-kind", "topic" if from_topic else "node"))
    if kind not in KIND_CODES:
        raise WireError("unknown comms-to-kind %r" % kind)
    default_to = routing_key if from_topic else node_id
    pairs = headers.get("comms-headers")
    if pairs is None:
        pairs = [["content-type", properties.content_type]] if properties.content_type else []
        pairs += [[name, value] for name, value in sorted(headers.items()) if not name.startswith("comms-")]
    return Envelope(
        id=parse_id(properties.message_id),
        sender=_text(headers.get("comms-from", properties.app_id or "anonymous")),
        to_kind=kind,
        to=_text(headers.get("comms-to", default_to)),
        payload=body,
        correlation_id=parse_id(properties.correlation_id) if properties.correlation_id else None,
        headers=[(_text(name), _text(value)) for name, value in pairs],
    )
