"""``qcstream subscribe``: print defects, results, dead letters, labels or alerts as JSON lines, for other systems."""

from __future__ import annotations

import argparse
import logging
import sys

from qcstream.settings import Settings

logger = logging.getLogger("qcstream.cli")


def cmd_subscribe(args: argparse.Namespace) -> int:
    from qcstream.streams.subscribe import as_json_line, subscribe

    if args.max_messages is not None and args.max_messages < 1:
        raise ValueError(f"--max-messages {args.max_messages} is invalid: give at least 1, or leave it out to read until stopped")
    printed = skipped = 0
    for record, raw, error in subscribe(Settings.from_env(), args.stream, args.group, args.from_beginning, args.timeout):
        if record is None:
            skipped += 1
            logger.warning("Skipped an undecodable %s message (%s): %r", args.stream, error, raw[:200])
            continue
        print(as_json_line(record), flush=True)
        printed += 1
        if args.max_messages is not None and printed >= args.max_messages:
            break
    print(f"{printed} record(s), {skipped} skipped", file=sys.stderr)
    return 0


def add_subscribe_command(commands) -> None:
    subscribe = commands.add_parser(
        "subscribe",
        help="print defects, results, dead letters, labels or alerts as JSON lines, one record per line",
        description="Read a qcstream topic and print each record as one JSON line on standard output, "
        "for a reject gate, an MES or a shell pipe. Stop with Ctrl-C.",
    )
    subscribe.add_argument(
        "stream",
        choices=["defects", "results", "dead-letter", "labels", "alerts"],
        help="what to read: defective frames only, every result, frames that failed, inspector labels, or drift alerts",
    )
    subscribe.add_argument("--from-beginning", action="store_true", help="start at the oldest record kept by Kafka, not at new ones")
    subscribe.add_argument("--group", help="Kafka consumer group: resume where this group stopped and commit offsets (default: none, nothing committed)")
    subscribe.add_argument("--max-messages", type=int, help="stop after printing this many records")
    subscribe.add_argument("--timeout", type=float, help="stop after this many seconds without a message (default: never)")
    subscribe.set_defaults(func=cmd_subscribe)
