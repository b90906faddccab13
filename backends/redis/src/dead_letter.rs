//! The dead-letter stream of an inbox, `<inbox>:dead-letter`: where an entry goes that is
//! never delivered to the application, with the reason.
//!
//! | cause | reason (field `error`) |
//! |---|---|
//! | not a comms message (a field missing or malformed) | names the field, e.g. ``field `id` is missing`` |
//! | payload above `max_message_size` | [`comms_plugin_api::inbound::oversized_reason`] |
//! | refused by the receiving node (settled `REJECTED_DISCARD`) | [`comms_plugin_api::inbound::DISCARDED_BY_RECEIVER`] |
//!
//! A dead-letter entry has the fields `error` (the reason), `entry` (the id the entry had in
//! the inbox) and `field:<name>` for each field of the entry (the first [`MAX_FIELDS`]). The
//! stream is capped near [`MAX_LEN`] entries (`MAXLEN ~`): the oldest dead letters go first.

use crate::connection::Connection;
use redis::RedisError;
use std::time::Duration;

/// Approximate cap of a dead-letter stream.
pub const MAX_LEN: u64 = 10_000;

/// Fields of an entry copied to its dead letter: a Lua call has a bounded number of arguments,
/// and an entry with more fields than this is not a comms message anyway.
pub const MAX_FIELDS: usize = 200;

/// Copies each entry to the dead-letter stream with its reason, then acknowledges and deletes it
/// in the inbox, all in one step inside Redis (the entry's fields never travel back over the
/// wire). `KEYS`: inbox, dead-letter stream. `ARGV`: group, cap, max fields, then (entry id,
/// reason) pairs. An entry no longer in the stream (trimmed) is only acknowledged.
const MOVE: &str = r"
local inbox, dead, group = KEYS[1], KEYS[2], ARGV[1]
local cap, max_fields = ARGV[2], tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
    local id, reason = ARGV[i], ARGV[i + 1]
    local found = redis.call('XRANGE', inbox, id, id)
    if #found == 1 then
        local fields = found[1][2]
        local args = {'XADD', dead, 'MAXLEN', '~', cap, '*', 'error', reason, 'entry', id}
        for j = 1, math.min(#fields, 2 * max_fields), 2 do
            args[#args + 1] = 'field:' .. fields[j]
            args[#args + 1] = fields[j + 1]
        end
        redis.call(unpack(args))
    end
    redis.call('XACK', inbox, group, id)
    redis.call('XDEL', inbox, id)
end
return 0
";

/// Moves `entries` (entry id, reason) of `inbox` to `dead_letter`. On failure nothing is
/// acknowledged: the entries stay pending and are claimed, and moved, again.
pub(crate) async fn move_entries(
    connection: &mut Connection,
    inbox: &str,
    dead_letter: &str,
    group: &str,
    entries: &[(String, String)],
    timeout: Duration,
) -> Result<(), RedisError> {
    // EVAL (not EVALSHA): the script is short, and needs no `script` feature of redis-rs.
    let mut command = redis::cmd("EVAL");
    command.arg(MOVE).arg(2).arg(inbox).arg(dead_letter).arg(group).arg(MAX_LEN).arg(MAX_FIELDS);
    for (id, reason) in entries {
        command.arg(id).arg(reason);
    }
    tokio::time::timeout(timeout, command.query_async::<i64>(connection))
        .await
        .unwrap_or_else(|_| Err(RedisError::from((redis::ErrorKind::IoError, "timed out"))))
        .map(drop)
}
