"""What every backend module offers the client (duck-typed; see RedisTransport for one).

    name                   the transport name comms nodes give the backend ("redis", "amqp", "sqlite")
    address                this client's own address on it (what its records announce)
    address_of(node_id)    the conventional address of a comms node
    send(address, env)     point to point (a message, a request, a response, a framework message)
    publish(env)           a topic message (env.to_kind == "topic")
    subscribe(pattern)     receive topic messages matching a comms pattern
    receive(timeout)       a list of Delivery that arrived within `timeout` seconds
    close()
"""

from dataclasses import dataclass
from typing import Callable

from .wire import Envelope


@dataclass
class Delivery:
    """A received envelope and how to acknowledge it (the broker forgets it then)."""

    envelope: Envelope
    ack: Callable[[], None]
