"""Framework headers and the record message of hellos, heartbeats and goodbyes (docs/wire.md,
"Framework messages")."""

import json
from dataclasses import dataclass, field
from typing import List, Tuple

KIND_HEADER = "comms-kind"
STATUS_HEADER = "comms-status"
CONTENT_TYPE_HEADER = "content-type"

HELLO, HEARTBEAT, GOODBYE, RESPONSE = "hello", "heartbeat", "goodbye", "response"
STATUS_OK, STATUS_ERROR, STATUS_UNAVAILABLE = "ok", "error", "unavailable"

JSON = "application/json"
POSTCARD = "application/x-postcard"
TEXT = "text/plain; charset=utf-8"

RECORD_MESSAGE_VERSION = 1


@dataclass
class RecordMessage:
    """What a node says about itself in a hello, heartbeat or goodbye.

    `addresses` pairs a transport *name* (the name the comms node gives the transport in its
    config, e.g. "redis") with this node's address on it.
    """

    addresses: List[Tuple[str, str]] = field(default_factory=list)
    services: List[str] = field(default_factory=list)
    topics: List[str] = field(default_factory=list)
    metadata: List[Tuple[str, str]] = field(default_factory=list)
    reply: bool = False
    offline: bool = False
    v: int = RECORD_MESSAGE_VERSION

    def encode(self) -> bytes:
        """Compact JSON with the keys in the order comms writes them (byte-identical to comms)."""
        return json.dumps({
            "v": self.v,
            "addresses": [list(pair) for pair in self.addresses],
            "services": list(self.services),
            "topics": list(self.topics),
            "metadata": [list(pair) for pair in self.metadata],
            "reply": self.reply,
            "offline": self.offline,
        }, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "RecordMessage":
        """Reads a record message; unknown keys are ignored, `v` is required and not 0."""
        value = json.loads(data.decode("utf-8"))
        if not isinstance(value, dict) or not value.get("v"):
            raise ValueError("record message without a version")
        return cls(
            addresses=[tuple(pair) for pair in value.get("addresses", [])],
            services=list(value.get("services", [])),
            topics=list(value.get("topics", [])),
            metadata=[tuple(pair) for pair in value.get("metadata", [])],
            reply=bool(value.get("reply", False)),
            offline=bool(value.get("offline", False)),
            v=value["v"],
        )

    def address_for(self, transport: str):
        for name, address in self.addresses:
            if name == transport:
                return address
        return None


def is_framework(headers) -> bool:
    """Whether a message carries a framework kind (not for the application)."""
    return any(name == KIND_HEADER for name, _ in headers)
