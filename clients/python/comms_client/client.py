"""A comms node in Python: introduces itself, keeps peers informed, sends, requests, answers
requests, publishes and subscribes, over any of the transport modules.

Single-threaded: framework work (answering hellos, sending heartbeats, matching responses) happens
inside `receive` and `request`, so call `receive` regularly while the client should stay alive
for its peers (they mark it down after their `peer_timeout_ms` of silence, 5 s by default).
Messages are acknowledged to the broker when `receive` hands them out (at-most-once from then on).
"""

import collections
import json
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from . import control
from .control import RecordMessage
from .wire import Envelope, new_id


class RequestError(Exception):
    """A request got an error response, or none in time."""


class Client:
    def __init__(self, node_id: str, transport, services: Iterable[str] = (),
                 heartbeat_interval: float = 1.0):
        self.id = node_id
        self.transport = transport
        self.services = list(services)
        self.topics: List[str] = []
        self.heartbeat_interval = heartbeat_interval
        self.peers: Dict[str, RecordMessage] = {}
        self.backlog = collections.deque()
        self.last_heartbeat = 0.0

    # ---- records ------------------------------------------------------------------------------

    def record(self, reply: bool = False, offline: bool = False) -> RecordMessage:
        return RecordMessage(addresses=[(self.transport.name, self.transport.address)],
                             services=self.services, topics=self.topics, reply=reply, offline=offline)

    def _control(self, kind: str, payload: bytes, to: str) -> Envelope:
        # As comms writes them: the kind is the only header (the payload is always JSON).
        headers = [(control.KIND_HEADER, kind)]
        return Envelope(new_id(), self.id, "node", to, payload, headers=headers)

    def _address(self, node_id: str) -> str:
        record = self.peers.get(node_id)
        address = record.address_for(self.transport.name) if record else None
        return address or self.transport.address_of(node_id)

    def hello(self, peer: str) -> None:
        """Tells `peer` who this client is (its address, services, topics); the peer answers with
        a heartbeat carrying its own record, which `receive` takes in."""
        message = self._control(control.HELLO, self.record(reply=True).encode(), peer)
        self.transport.send(self._address(peer), message)
        # Known from now on (heartbeats go to it); its record arrives with its answer.
        self.peers.setdefault(peer, RecordMessage())

    def wait_for_peer(self, peer: str, timeout: float = 5.0) -> bool:
        """Whether `peer`'s record (its answer to `hello`) arrived within `timeout` seconds;
        application messages arriving meanwhile wait for `receive`."""
        deadline = time.monotonic() + timeout
        while not (peer in self.peers and self.peers[peer].addresses):
            if time.monotonic() >= deadline:
                return False
            self.backlog.extend(self._pump(min(0.1, deadline - time.monotonic())))
        return True

    def heartbeat(self) -> None:
        """Sends this client's record to every peer it knows (done by `receive` every interval)."""
        self.last_heartbeat = time.monotonic()
        for peer in list(self.peers):
            self.transport.send(self._address(peer),
                                self._control(control.HEARTBEAT, self.record().encode(), peer))

    def goodbye(self) -> None:
        for peer in list(self.peers):
            self.transport.send(self._address(peer),
                                self._control(control.GOODBYE, self.record().encode(), peer))

    # ---- sending ------------------------------------------------------------------------------

    def send(self, to: str, payload: bytes, headers: Iterable[Tuple[str, str]] = (),
             correlation_id: Optional[int] = None) -> int:
        """Sends `payload` to node `to`; returns the message id."""
        envelope = Envelope(new_id(), self.id, "node", to, payload, correlation_id, list(headers))
        self.transport.send(self._address(to), envelope)
        return envelope.id

    def send_json(self, to: str, value, correlation_id: Optional[int] = None) -> int:
        return self.send(to, _json(value), [(control.CONTENT_TYPE_HEADER, control.JSON)], correlation_id)

    def publish_json(self, topic: str, value) -> int:
        envelope = Envelope(new_id(), self.id, "topic", topic, _json(value),
                            headers=[(control.CONTENT_TYPE_HEADER, control.JSON)])
        self.transport.publish(envelope)
        return envelope.id

    def subscribe(self, pattern: str) -> None:
        """Receives topic messages matching `pattern` from now on (announced in the next record)."""
        self.transport.subscribe(pattern)
        self.topics.append(pattern)

    def request_json(self, service: str, value, node: Optional[str] = None, timeout: float = 5.0):
        """Calls `service` on `node` (default: a peer whose record lists it) and returns the
        decoded JSON answer; RequestError for an error response or none within `timeout`."""
        if node is None:
            node = next((peer for peer, record in self.peers.items() if service in record.services), None)
            if node is None:
                raise RequestError("no known peer serves %r" % service)
        request = Envelope(new_id(), self.id, "service", service, _json(value),
                           headers=[(control.CONTENT_TYPE_HEADER, control.JSON)])
        self.transport.send(self._address(node), request)
        def answers(envelope: Envelope) -> bool:
            return envelope.header(control.KIND_HEADER) == control.RESPONSE \
                and envelope.correlation_id == request.id

        response = self.receive(timeout, answers)
        if response is None:
            raise RequestError("no answer from %s to %r within %.1f s" % (node, service, timeout))
        status = response.header(control.STATUS_HEADER) or control.STATUS_OK
        if status != control.STATUS_OK:
            raise RequestError("%s answered %s: %s" % (response.sender, status,
                                                       response.payload.decode("utf-8", "replace")))
        return json.loads(response.payload)

    def respond(self, request: Envelope, payload: bytes, content_type: str = control.JSON,
                status: str = control.STATUS_OK) -> None:
        """Answers `request` (an envelope to a service): to its sender, correlated by its id."""
        headers = [(control.KIND_HEADER, control.RESPONSE), (control.STATUS_HEADER, status),
                   (control.CONTENT_TYPE_HEADER, content_type)]
        response = Envelope(new_id(), self.id, "node", request.sender, payload, request.id, headers)
        self.transport.send(self._address(request.sender), response)

    # ---- receiving ----------------------------------------------------------------------------

    def _pump(self, timeout: float) -> List[Envelope]:
        """One round: heartbeats when due, then what arrived, framework messages handled."""
        if time.monotonic() - self.last_heartbeat >= self.heartbeat_interval:
            self.heartbeat()
        out = []
        for delivery in self.transport.receive(max(0.0, timeout)):
            delivery.ack()
            envelope = delivery.envelope
            kind = envelope.header(control.KIND_HEADER)
            if kind in (control.HELLO, control.HEARTBEAT):
                message = RecordMessage.decode(envelope.payload)
                new = envelope.sender not in self.peers or not self.peers[envelope.sender].addresses
                self.peers[envelope.sender] = message
                if message.reply or new:
                    self.transport.send(self._address(envelope.sender), self._control(
                        control.HEARTBEAT, self.record().encode(), envelope.sender))
            elif kind == control.GOODBYE:
                self.peers.pop(envelope.sender, None)
            else:
                out.append(envelope)
        return out

    def receive(self, timeout: float = 5.0,
                want: Callable[[Envelope], bool] = lambda envelope: True) -> Optional[Envelope]:
        """The next application message (a message, a request, a topic message, a late response)
        for which `want` is true, within `timeout` seconds; others wait for later calls."""
        for envelope in list(self.backlog):
            if want(envelope):
                self.backlog.remove(envelope)
                return envelope
        deadline = time.monotonic() + timeout
        while True:
            found = None
            for envelope in self._pump(min(0.1, max(0.0, deadline - time.monotonic()))):
                if found is None and want(envelope):
                    found = envelope
                else:
                    self.backlog.append(envelope)
            if found is not None or time.monotonic() >= deadline:
                return found

    def close(self, delete_inbox: bool = False) -> None:
        self.goodbye()
        self.transport.close(delete_inbox=delete_inbox)


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")
