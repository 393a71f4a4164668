"""Dead letters: messages the worker could not process, kept with the reason.

The dead-letter topic keeps the original key and value, so an operator can fix the
cause and send the message again. The ids are filled in where the message carries
them, even when it did not parse as a record.
"""

from __future__ import annotations

import json
import time

from qcstream.streams.records import DeadLetter

#: Maximum characters of the original message kept in a dead letter (a frame reference is about 400).
MAX_DEAD_LETTER_VALUE_CHARS = 100_000


def text_of(raw: bytes | None) -> str | None:
    """Return a message key or value as text for a dead letter, cut to a safe length."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw[:MAX_DEAD_LETTER_VALUE_CHARS]
    return bytes(raw)[:MAX_DEAD_LETTER_VALUE_CHARS].decode("utf-8", errors="replace")


def ids_of(raw: bytes | None) -> dict[str, str | None]:
    """Return the frame, line and camera ids found in a message body, None where absent."""
    ids: dict[str, str | None] = {"frame_id": None, "line_id": None, "camera_id": None}
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, TypeError, RecursionError):
        return ids
    if isinstance(body, dict):
        for name in ids:
            value = body.get(name)
            ids[name] = value[:128] if isinstance(value, str) else None
    return ids


def dead_letter(source_topic: str, reason: str, key: bytes | None, value: bytes | None) -> DeadLetter:
    """Return a dead letter for a message, with whatever ids it carries."""
    return DeadLetter(
        source_topic=source_topic,
        reason=reason,
        failed_at=time.time(),
        original_value=text_of(value) or "",
        original_key=text_of(key),
        **ids_of(value),
    )
