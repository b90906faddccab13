"""A Python node exchanging every kind of message with a running comms node.

    python3 clients/python/examples/interop.py BACKEND ME PEER [OPTION=VALUE ...]

BACKEND is redis (options: url, prefix), amqp (url) or sqlite (database). ME is this program's
node id, PEER the comms node's. The comms node is expected to serve `rs.echo` (answering
{"echo": <request>}), to subscribe to `rs-test.*`, and, in this order: to receive a message, then
on a message {"subscribed": ...} to publish on `py-test.news`, to receive what this program
publishes on `rs-test.news`, to call this program's service `py.reverse`, and to send a last
message. tests/tests/python_client.rs is that node. Each step prints one JSON line.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from comms_client import Client  # noqa: E402
from comms_client.control import CONTENT_TYPE_HEADER  # noqa: E402

TIMEOUT = 20.0


def transport_for(backend: str, me: str, options: dict):
    if backend == "redis":
        from comms_client.redis_transport import RedisTransport
        return RedisTransport(me, **options)
    if backend == "amqp":
        from comms_client.amqp_transport import AmqpTransport
        return AmqpTransport(me, inbox_expires_ms=60000, **options)
    if backend == "sqlite":
        from comms_client.sqlite_transport import SqliteTransport
        return SqliteTransport(me, **options)
    sys.exit("unknown backend %r (redis, amqp or sqlite)" % backend)


def report(step: str, **fields) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def expect(found, what: str):
    if found is None:
        sys.exit("no %s within %.0f s" % (what, TIMEOUT))
    return found


def main() -> None:
    backend, me, peer = sys.argv[1:4]
    options = dict(arg.split("=", 1) for arg in sys.argv[4:])
    client = Client(me, transport_for(backend, me, options), services=["py.reverse"])

    # 1. Introduce ourselves; the node answers with its record (a heartbeat).
    client.hello(peer)
    if not client.wait_for_peer(peer, TIMEOUT):
        sys.exit("%s did not answer the hello within %.0f s" % (peer, TIMEOUT))
    report("peer", services=client.peers[peer].services)

    # 2. Point to point.
    sent = client.send_json(peer, {"greeting": "hello from python", "n": 1})
    report("sent", id="%032x" % sent)

    # 3. Request / response: call the node's service.
    report("response", value=client.request_json("rs.echo", {"text": "ping"}, timeout=TIMEOUT))

    # 4. Topics, comms -> Python: subscribe, then tell the node to publish.
    client.subscribe("py-test.*")
    client.heartbeat()
    client.send_json(peer, {"subscribed": "py-test.*"})
    publication = expect(client.receive(TIMEOUT, lambda e: e.to_kind == "topic"), "publication")
    report("publication", topic=publication.to, sender=publication.sender,
           content_type=publication.header(CONTENT_TYPE_HEADER), value=json.loads(publication.payload))

    # 5. Topics, Python -> comms.
    client.publish_json("rs-test.news", {"headline": "from python"})
    report("published")

    # 6. Request / response: answer the node's call of our service.
    request = expect(client.receive(TIMEOUT, lambda e: e.to_kind == "service"), "request")
    text = json.loads(request.payload)["text"]
    client.respond(request, json.dumps({"reversed": text[::-1]}).encode())
    report("request", service=request.to, sender=request.sender, value={"text": text})

    # 7. Point to point, comms -> Python.
    message = expect(client.receive(TIMEOUT, lambda e: e.to_kind == "node"), "last message")
    report("message", sender=message.sender, content_type=message.header(CONTENT_TYPE_HEADER),
           value=json.loads(message.payload))
    client.close(delete_inbox=True)


if __name__ == "__main__":
    main()
