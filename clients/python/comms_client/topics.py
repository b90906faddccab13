"""Topic patterns as comms matches them: `*` is exactly one segment, `>` (last) one or more."""


def matches(pattern: str, topic: str) -> bool:
    """Whether `topic` matches `pattern`."""
    wanted = pattern.split(".")
    segments = topic.split(".")
    for index, segment in enumerate(wanted):
        if segment == ">":
            return len(segments) > index
        if index >= len(segments) or (segment != "*" and segment != segments[index]):
            return False
    return len(segments) == len(wanted)


def validate_topic(topic: str) -> None:
    """Raises ValueError for a topic with an empty segment or a wildcard."""
    for segment in topic.split("."):
        if not segment or "*" in segment or ">" in segment:
            raise ValueError("invalid topic %r" % topic)
