"""The comms wire encoding, version 1 (docs/wire.md, "The envelope"), and the TCP frames.

Pure Python, no dependencies. Every integer is big-endian; a `str` is a u16 byte length and that
many bytes of UTF-8.
"""

import os
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

WIRE_VERSION = 1

# Destination kinds: the byte on the wire and the name the broker formats use.
KIND_NODE, KIND_TOPIC, KIND_SERVICE = 0, 1, 2
KIND_NAMES = {KIND_NODE: "node", KIND_TOPIC: "topic", KIND_SERVICE: "service"}
KIND_CODES = {name: code for code, name in KIND_NAMES.items()}

FLAG_CORRELATION = 0x01
FLAG_EXTENSIONS = 0x02

# TCP (and Unix socket) frame kinds: the first byte of a frame body.
FRAME_HELLO, FRAME_ENVELOPE, FRAME_GOODBYE, FRAME_NOISE = 1, 2, 3, 4
HELLO_MAGIC = b"COMMS"
STREAM_PROTOCOL_VERSION = 1


class WireError(ValueError):
    """Bytes that are not a valid envelope or frame; the message says why."""


@dataclass
class Envelope:
    """One comms message. `to_kind` is "node", "topic" or "service"."""

    id: int
    sender: str
    to_kind: str
    to: str
    payload: bytes
    correlation_id: Optional[int] = None
    headers: List[Tuple[str, str]] = field(default_factory=list)
    extensions: List[Tuple[str, bytes]] = field(default_factory=list)

    def header(self, name: str) -> Optional[str]:
        """The first value of header `name`, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def new_id() -> int:
    """A fresh random 128-bit message id (comms uses random ids; uniqueness is what matters)."""
    return int.from_bytes(os.urandom(16), "big")


def id_hex(value: int) -> str:
    """A message id as the broker formats write it: 32 lowercase hex digits."""
    return "%032x" % value


def parse_id(text: str) -> int:
    """A message id from 1 to 32 hex digits (dashes, as in a UUID, are ignored)."""
    digits = text.replace("-", "")
    if not 1 <= len(digits) <= 32 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise WireError("message id %r is not 1 to 32 hex digits" % text)
    return int(digits, 16)


def _put_str(out: bytearray, text: str, what: str) -> None:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise WireError("%s is too long to encode" % what)
    out += struct.pack(">H", len(data))
    out += data


def encode_envelope(envelope: Envelope) -> bytes:
    """The wire encoding of `envelope`."""
    if envelope.to_kind not in KIND_CODES:
        raise WireError("unknown destination kind %r" % envelope.to_kind)
    out = bytearray([WIRE_VERSION])
    out += envelope.id.to_bytes(16, "big")
    out.append(KIND_CODES[envelope.to_kind])
    _put_str(out, envelope.to, "destination")
    _put_str(out, envelope.sender, "sender")
    flags = 0
    if envelope.correlation_id is not None:
        flags |= FLAG_CORRELATION
    if envelope.extensions:
        flags |= FLAG_EXTENSIONS
    out.append(flags)
    if envelope.correlation_id is not None:
        out += envelope.correlation_id.to_bytes(16, "big")
    if len(envelope.headers) > 0xFFFF:
        raise WireError("header count is too long to encode")
    out += struct.pack(">H", len(envelope.headers))
    for name, value in envelope.headers:
        _put_str(out, name, "header name")
        _put_str(out, value, "header value")
    if envelope.extensions:
        out += struct.pack(">H", len(envelope.extensions))
        for key, value in envelope.extensions:
            _put_str(out, key, "extension key")
            out += struct.pack(">I", len(value))
            out += value
    out += struct.pack(">I", len(envelope.payload))
    out += envelope.payload
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.at = 0

    def take(self, n: int, what: str) -> bytes:
        if len(self.data) - self.at < n:
            raise WireError("envelope truncated while reading %s" % what)
        chunk = bytes(self.data[self.at:self.at + n])
        self.at += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack(">H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack(">I", self.take(4, what))[0]

    def u128(self, what: str) -> int:
        return int.from_bytes(self.take(16, what), "big")

    def string(self, what: str) -> str:
        data = self.take(self.u16(what), what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("%s is not valid UTF-8" % what) from None


def decode_envelope(data: bytes) -> Envelope:
    """The envelope that fills `data` exactly; WireError says what is wrong otherwise."""
    reader = _Reader(data)
    version = reader.u8("version")
    if version != WIRE_VERSION:
        raise WireError("unsupported wire version %d" % version)
    message_id = reader.u128("message id")
    kind = reader.u8("destination kind")
    to = reader.string("destination")
    if kind not in KIND_NAMES:
        raise WireError("unknown destination kind %d" % kind)
    sender = reader.string("sender")
    flags = reader.u8("flags")
    if flags & ~(FLAG_CORRELATION | FLAG_EXTENSIONS):
        raise WireError("unknown flags 0x%02x" % flags)
    correlation = reader.u128("correlation id") if flags & FLAG_CORRELATION else None
    headers = [(reader.string("header name"), reader.string("header value"))
               for _ in range(reader.u16("header count"))]
    extensions = []
    if flags & FLAG_EXTENSIONS:
        for _ in range(reader.u16("extension count")):
            key = reader.string("extension key")
            extensions.append((key, reader.take(reader.u32("extension value length"), "extension value")))
    payload = reader.take(reader.u32("payload length"), "payload")
    if reader.at != len(data):
        raise WireError("%d unexpected bytes after the payload" % (len(data) - reader.at))
    return Envelope(message_id, sender, KIND_NAMES[kind], to, payload, correlation, headers, extensions)


def frame(body: bytes) -> bytes:
    """A length-prefixed frame: u32 body length, then the body."""
    return struct.pack(">I", len(body)) + body


def hello_frame(node_id: str) -> bytes:
    """The HELLO frame that opens a TCP connection from node `node_id`."""
    data = node_id.encode("utf-8")
    return frame(bytes([FRAME_HELLO]) + HELLO_MAGIC + bytes([STREAM_PROTOCOL_VERSION])
                 + struct.pack(">H", len(data)) + data)


def envelope_frame(envelope: Envelope) -> bytes:
    """The ENVELOPE frame that carries `envelope` on a TCP connection."""
    return frame(bytes([FRAME_ENVELOPE]) + encode_envelope(envelope))


def goodbye_frame() -> bytes:
    """The GOODBYE frame a side sends before closing a TCP connection."""
    return frame(bytes([FRAME_GOODBYE]))


def split_frames(data: bytes) -> Tuple[List[bytes], bytes]:
    """The complete frame bodies at the start of `data`, and the bytes left over."""
    bodies = []
    at = 0
    while len(data) - at >= 4:
        (length,) = struct.unpack(">I", data[at:at + 4])
        if len(data) - at - 4 < length:
            break
        bodies.append(bytes(data[at + 4:at + 4 + length]))
        at += 4 + length
    return bodies, bytes(data[at:])


def parse_hello(body: bytes) -> str:
    """The node id of a HELLO frame body."""
    if len(body) < 9 or body[0] != FRAME_HELLO or body[1:6] != HELLO_MAGIC:
        raise WireError("not a comms hello")
    if body[6] != STREAM_PROTOCOL_VERSION:
        raise WireError("unsupported stream protocol version %d" % body[6])
    (length,) = struct.unpack(">H", body[7:9])
    if len(body) != 9 + length:
        raise WireError("malformed hello")
    return body[9:].decode("utf-8")
