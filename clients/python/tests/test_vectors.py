"""The shared test vectors of docs/wire-vectors.json, which the Rust tests check too
(tests/tests/wire_vectors.rs): this package encodes and decodes exactly what comms does.

Run: python3 -m unittest discover -s clients/python/tests
"""

import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from comms_client import control, topics, wire  # noqa: E402

VECTORS_FILE = os.path.join(HERE, "..", "..", "..", "docs", "wire-vectors.json")
with open(VECTORS_FILE, encoding="utf-8") as file:
    VECTORS = json.load(file)


def envelope_of(vector) -> wire.Envelope:
    correlation = vector["correlation_id"]
    return wire.Envelope(
        id=int(vector["id"], 16),
        sender=vector["from"],
        to_kind=vector["to_kind"],
        to=vector["to"],
        payload=bytes.fromhex(vector["payload_hex"]),
        correlation_id=int(correlation, 16) if correlation else None,
        headers=[tuple(pair) for pair in vector["headers"]],
        extensions=[(key, bytes.fromhex(value)) for key, value in vector["extensions"]],
    )


class EnvelopeVectors(unittest.TestCase):
    def test_the_version_is_the_one_this_package_speaks(self):
        self.assertEqual(VECTORS["wire_version"], wire.WIRE_VERSION)

    def test_every_envelope_encodes_to_its_bytes_and_back(self):
        self.assertGreaterEqual(len(VECTORS["envelopes"]), 5)
        for vector in VECTORS["envelopes"]:
            with self.subTest(vector["name"]):
                envelope = envelope_of(vector)
                self.assertEqual(wire.encode_envelope(envelope).hex(), vector["hex"])
                self.assertEqual(wire.decode_envelope(bytes.fromhex(vector["hex"])), envelope)

    def test_every_invalid_envelope_is_refused_with_its_reason(self):
        for vector in VECTORS["invalid_envelopes"]:
            with self.subTest(vector["name"]):
                with self.assertRaises(wire.WireError) as raised:
                    wire.decode_envelope(bytes.fromhex(vector["hex"]))
                self.assertIn(vector["error"], str(raised.exception))

    def test_every_truncation_is_refused(self):
        for vector in VECTORS["envelopes"]:
            data = bytes.fromhex(vector["hex"])
            for cut in range(len(data)):
                with self.assertRaises(wire.WireError, msg="%s cut at %d" % (vector["name"], cut)):
                    wire.decode_envelope(data[:cut])


class FrameVectors(unittest.TestCase):
    def test_tcp_frames(self):
        envelopes = {vector["name"]: envelope_of(vector) for vector in VECTORS["envelopes"]}
        for vector in VECTORS["tcp_frames"]:
            with self.subTest(vector["name"]):
                if vector["name"] == "hello":
                    built = wire.hello_frame(vector["node"])
                    self.assertEqual(wire.parse_hello(built[4:]), vector["node"])
                elif vector["name"] == "envelope":
                    built = wire.envelope_frame(envelopes[vector["envelope"]])
                else:
                    built = wire.goodbye_frame()
                self.assertEqual(built.hex(), vector["hex"])
        stream = b"".join(bytes.fromhex(vector["hex"]) for vector in VECTORS["tcp_frames"])
        bodies, rest = wire.split_frames(stream + b"\x00\x00")
        self.assertEqual([body[0] for body in bodies], [wire.FRAME_HELLO, wire.FRAME_ENVELOPE, wire.FRAME_GOODBYE])
        self.assertEqual(rest, b"\x00\x00")


class RecordMessageVectors(unittest.TestCase):
    def test_record_messages_encode_byte_for_byte_and_ignore_unknown_keys(self):
        for vector in VECTORS["record_messages"]:
            with self.subTest(vector["name"]):
                message = control.RecordMessage(
                    addresses=[tuple(pair) for pair in vector["addresses"]],
                    services=vector["services"], topics=vector["topics"],
                    metadata=[tuple(pair) for pair in vector["metadata"]],
                    reply=vector["reply"], offline=vector["offline"])
                self.assertEqual(message.encode().decode(), vector["json"])
                self.assertEqual(control.RecordMessage.decode(vector["json"].encode()), message)
        future = control.RecordMessage.decode(b'{"v":7,"services":["x"],"zones":["eu"]}')
        self.assertEqual(future.services, ["x"])
        with self.assertRaises(ValueError):
            control.RecordMessage.decode(b'{"services":[]}')


class TopicPatterns(unittest.TestCase):
    def test_the_comms_rules(self):
        self.assertTrue(topics.matches("orders.*.created", "orders.us.created"))
        self.assertFalse(topics.matches("orders.*.created", "orders.us.west.created"))
        self.assertTrue(topics.matches("orders.>", "orders.eu.created.late"))
        self.assertFalse(topics.matches("orders.>", "orders"))
        self.assertTrue(topics.matches(">", "a"))
        self.assertFalse(topics.matches("*.*", "a.b.c"))


if __name__ == "__main__":
    unittest.main()
