"""comms_client: a pure-Python comms node for the Redis, AMQP and SQLite backends, written from
docs/wire.md. `wire` (the envelope encoding and TCP frames) and `control` (framework messages)
need nothing but the standard library; `redis_transport` needs redis-py, `amqp_transport` pika,
`sqlite_transport` the standard sqlite3 module."""

from .client import Client, RequestError
from .wire import Envelope, WireError, decode_envelope, encode_envelope, new_id

__all__ = ["Client", "RequestError", "Envelope", "WireError", "decode_envelope", "encode_envelope", "new_id"]
