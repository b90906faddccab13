"""comms over a shared SQLite file (docs/sqlite.md, docs/wire.md "SQLite"): a row of
`comms_mailbox` per message, holding the envelope in the wire encoding; topics as one row per
subscribed node. Open the file from its own process (never from a process whose comms node has
it open: SQLite's POSIX locks belong to the process)."""

import os
import sqlite3
import time

from . import control, topics
from .transport import Delivery
from .wire import Envelope, WireError, decode_envelope, encode_envelope

# The claim statement comms uses: take up to N free rows of one mailbox, oldest first, with a
# lease; the row is deleted on acknowledgement, freed on a negative one.
CLAIM = """UPDATE comms_mailbox SET owner = ?1, locked_until = ?2, attempts = attempts + 1
WHERE id IN (SELECT id FROM comms_mailbox WHERE recipient = ?3 AND locked_until <= ?4
             ORDER BY id LIMIT ?5)
RETURNING id, envelope, attempts"""

DEAD_LETTER = """INSERT INTO comms_dead_letter (id, recipient, envelope, enqueued_at, attempts, dead_at, reason)
SELECT id, recipient, envelope, enqueued_at, attempts, ?2, ?3 FROM comms_mailbox WHERE id = ?1"""

SCHEMA_VERSION = 3

# Framework messages that carry the sender's whole record: a newer one replaces an older one of the
# same kind from the same sender that nobody has claimed yet (docs/sqlite.md "Retention").
RECORD_KINDS = (control.HELLO, control.HEARTBEAT, control.GOODBYE)


def replacement_key(envelope: Envelope):
    """'<kind>:<sender>' for a hello, heartbeat or goodbye to a node; None for every other message."""
    kind = envelope.header(control.KIND_HEADER)
    if envelope.to_kind != "node" or kind not in RECORD_KINDS:
        return None
    return "%s:%s" % (kind, envelope.sender)


def now_ms() -> int:
    return int(time.time() * 1000)


class SqliteTransport:
    """Point to point, topics and acknowledgements through one SQLite database file."""

    name = "sqlite"

    def __init__(self, node_id: str, database: str, lease_ms: int = 30000, max_attempts: int = 10):
        self.node_id = node_id
        self.address = node_id
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.owner = "python-%s-%d-%s" % (node_id, os.getpid(), os.urandom(4).hex())
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE below.
        self.db = sqlite3.connect(database, timeout=5.0, isolation_level=None)
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise RuntimeError("%s has schema version %d, not %d: start a comms node on it first"
                               % (database, version, SCHEMA_VERSION))
        self.patterns = []

    def address_of(self, node_id: str) -> str:
        return node_id

    def _immediate(self, work):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return result

    def send(self, address: str, envelope: Envelope) -> None:
        encoded = encode_envelope(envelope)
        key = replacement_key(envelope)

        def write():
            now = now_ms()
            if key is not None:
                self.db.execute("DELETE FROM comms_mailbox WHERE recipient = ? AND replace_key = ?"
                                " AND locked_until <= ?", (address, key, now))
            self.db.execute(
                "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at, replace_key) VALUES (?, ?, ?, ?)",
                (address, encoded, now, key))
        self._immediate(write)

    def publish(self, envelope: Envelope) -> None:
        encoded = encode_envelope(envelope)

        def write():
            rows = self.db.execute("SELECT node_id, pattern FROM comms_subscription").fetchall()
            # One row per subscribed node, however many of its patterns match, naming the first
            # matching pattern in byte order: a comms node claims the copy once it subscribes to
            # that pattern (schema version 3).
            held_for = {}
            for node, pattern in rows:
                if topics.matches(pattern, envelope.to):
                    held_for[node] = min(held_for.get(node, pattern), pattern)
            for node in sorted(held_for):
                self.db.execute(
                    "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at, pattern) VALUES (?, ?, ?, ?)",
                    (node, encoded, now_ms(), held_for[node]))
        self._immediate(write)

    def subscribe(self, pattern: str) -> None:
        self._immediate(lambda: self.db.execute(
            "INSERT INTO comms_subscription (node_id, pattern, subscribed_at) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING", (self.node_id, pattern, now_ms())))
        self.patterns.append(pattern)

    def receive(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            deliveries = self._immediate(self._claim)
            if deliveries or time.monotonic() >= deadline:
                return deliveries
            time.sleep(min(0.02, max(0, deadline - time.monotonic())))

    def _claim(self):
        now = now_ms()
        rows = self.db.execute(CLAIM, (self.owner, now + self.lease_ms, self.node_id, now, 64)).fetchall()
        deliveries = []
        for row_id, encoded, attempts in sorted(rows):
            reason = None
            if attempts > self.max_attempts:
                reason = "delivered max_attempts times without being accepted"
            else:
                try:
                    envelope = decode_envelope(bytes(encoded))
                except (WireError, TypeError) as error:
                    reason = "not a valid wire-encoded envelope: %s" % error
            if reason is not None:
                self.db.execute(DEAD_LETTER, (row_id, now, reason))
                self.db.execute("DELETE FROM comms_mailbox WHERE id = ?", (row_id,))
                continue
            deliveries.append(Delivery(envelope, lambda row_id=row_id: self._accept(row_id)))
        return deliveries

    def _accept(self, row_id: int) -> None:
        self._immediate(lambda: self.db.execute(
            "DELETE FROM comms_mailbox WHERE id = ? AND owner = ?", (row_id, self.owner)))

    def close(self, delete_inbox: bool = False) -> None:
        def tidy():
            # Leases this client still holds go back to the mailbox at once.
            self.db.execute("UPDATE comms_mailbox SET locked_until = 0, owner = NULL WHERE owner = ?",
                            (self.owner,))
            for pattern in self.patterns:
                self.db.execute("DELETE FROM comms_subscription WHERE node_id = ? AND pattern = ?",
                                (self.node_id, pattern))
            if delete_inbox:
                self.db.execute("DELETE FROM comms_mailbox WHERE recipient = ?", (self.node_id,))
        self._immediate(tidy)
        self.db.close()
