"""``qcstream query``: named quality queries and ad-hoc SQL over the results and labels.

Also ``qcstream parquet-upload``, which copies the local Parquet files to a MinIO
bucket so that ``qcstream query --source s3://BUCKET`` can read them.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from qcstream.settings import Settings

logger = logging.getLogger(__name__)


def cmd_query(args: argparse.Namespace) -> int:
    from qcstream.storage.parquet_source import parse_source
    from qcstream.storage.query_library import NAMED_QUERIES, run_query

    if args.name == "list":
        for name, (description, _) in NAMED_QUERIES.items():
            print(f"{name:20}  {description}")
        return 0
    if (args.name is None) == (args.sql is None):
        raise ValueError("give either a query name (see `qcstream query list`) or --sql 'SELECT ...', not both or neither")
    if args.name is not None and args.name not in NAMED_QUERIES:
        raise ValueError(f"unknown query {args.name!r}; choose one of {', '.join(NAMED_QUERIES)} (or `qcstream query list`)")
    sql = NAMED_QUERIES[args.name][1] if args.name else args.sql

    settings = Settings.from_env()
    source = parse_source(args.source) if args.source else settings.data_dir
    if args.source and isinstance(source, Path) and not source.is_dir():
        raise ValueError(f"data folder {str(source)!r} not found: pass the folder that contains results/ and labels/")
    columns, rows = run_query(source, sql, window_seconds=args.window, last_n=args.last, settings=settings)
    if args.format == "json":
        for row in rows:
            print(json.dumps(dict(zip(columns, row)), default=str))
    else:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    return 0


def cmd_parquet_upload(args: argparse.Namespace) -> int:
    from qcstream.storage.objects import ObjectStore
    from qcstream.storage.parquet_mirror import ParquetMirror, upload_folder
    from qcstream.storage.parquet_source import S3Location, parse_source

    settings = Settings.from_env()
    destination = args.destination or (f"s3://{settings.parquet_bucket}" if settings.parquet_bucket else None)
    if destination is None:
        raise ValueError("no destination: pass s3://BUCKET[/PREFIX] or set QCSTREAM_PARQUET_BUCKET")
    location = parse_source(destination)
    if not isinstance(location, S3Location):
        raise ValueError(f"invalid destination {destination!r}: expected s3://BUCKET[/PREFIX]")
    root = args.source or settings.data_dir
    summary = upload_folder(ParquetMirror(ObjectStore(settings), location), root)
    print(f"uploaded {summary.uploaded} Parquet files from {root} to {location} ({summary.already_there} were there already)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid --last {text!r}: expected a positive whole number of labelled frames")
    return value


def add_query_command(commands) -> None:
    """Register ``qcstream query`` and ``qcstream parquet-upload``.

    Nothing here imports DuckDB or pyarrow, because the producer image builds this parser without them.
    """
    query = commands.add_parser(
        "query",
        help="run a named quality query or ad-hoc SQL over the results and labels",
        description="Query the Parquet results and labels with DuckDB, from $QCSTREAM_DATA_DIR or from a MinIO bucket "
        "(--source). Views: results, labels, alerts (latest row per frame or alert), results_rows, labels_rows and alerts_rows "
        "(every row written). Macros: wilson_low(errors, trials), wilson_high(errors, trials), results_since(seconds).",
    )
    query.add_argument("name", nargs="?", help="named query, or `list` to show them")
    query.add_argument("--sql", help="ad-hoc SQL instead of a named query. It may use $since (window start, Unix seconds) and $last_n.")
    query.add_argument("--window", type=float, help="only frames captured in the last SECONDS (default: all)")
    query.add_argument(
        "--last", type=_positive_int, metavar="N",
        help="rolling-rates-last: count each line's last N labelled frames (default: 200, DEFAULT_LAST_N of the query library)",
    )
    query.add_argument(
        "--source", metavar="DIR|s3://BUCKET[/PREFIX]",
        help="folder or bucket of the Parquet data (default: $QCSTREAM_DATA_DIR). A bucket is read with the QCSTREAM_MINIO_* settings.",
    )
    query.add_argument("--format", choices=["csv", "json"], default="csv", help="output: CSV with a header, or one JSON object per row (default: csv)")
    query.set_defaults(func=cmd_query)

    upload = commands.add_parser(
        "parquet-upload",
        help="copy the local Parquet files to a MinIO bucket, for `qcstream query --source s3://...`",
        description="Upload every Parquet file under the data folder that is not in the bucket yet, under the same "
        "relative key (results/date=.../line=.../part-....parquet). Set QCSTREAM_PARQUET_BUCKET to have the sink "
        "copy new files as it writes them.",
    )
    upload.add_argument("destination", nargs="?", help="s3://BUCKET[/PREFIX] (default: s3://$QCSTREAM_PARQUET_BUCKET)")
    upload.add_argument("--source", help="local data folder (default: $QCSTREAM_DATA_DIR)")
    upload.set_defaults(func=cmd_parquet_upload)
