"""``qcstream query``: named quality queries and ad-hoc SQL over the results and labels."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from qcstream.settings import Settings


def cmd_query(args: argparse.Namespace) -> int:
    from qcstream.storage.query_library import NAMED_QUERIES, run_query

    if args.name == "list":
        for name, (description, _) in NAMED_QUERIES.items():
            print(f"{name:16}  {description}")
        return 0
    if (args.name is None) == (args.sql is None):
        raise ValueError("give either a query name (see `qcstream query list`) or --sql 'SELECT ...', not both or neither")
    if args.name is not None and args.name not in NAMED_QUERIES:
        raise ValueError(f"unknown query {args.name!r}; choose one of {', '.join(NAMED_QUERIES)} (or `qcstream query list`)")
    sql = NAMED_QUERIES[args.name][1] if args.name else args.sql

    columns, rows = run_query(Settings.from_env().data_dir, sql, window_seconds=args.window)
    if args.format == "json":
        for row in rows:
            print(json.dumps(dict(zip(columns, row)), default=str))
    else:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    return 0


def add_query_command(commands) -> None:
    query = commands.add_parser(
        "query",
        help="run a named quality query or ad-hoc SQL over the results and labels",
        description="Query the Parquet results and labels in $QCSTREAM_DATA_DIR with DuckDB. Views: results, labels "
        "(latest row per frame). Macros: wilson_low(errors, trials), wilson_high(errors, trials).",
    )
    query.add_argument("name", nargs="?", help="named query, or `list` to show them")
    query.add_argument("--sql", help="ad-hoc SQL instead of a named query; may use $since (window start)")
    query.add_argument("--window", type=float, help="only frames captured in the last SECONDS (default: all)")
    query.add_argument("--format", choices=["csv", "json"], default="csv", help="output: CSV with a header, or one JSON object per row (default: csv)")
    query.set_defaults(func=cmd_query)
