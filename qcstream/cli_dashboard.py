"""``qcstream dashboard``: serve the live web dashboard over the Parquet results, MinIO and Kafka."""

from __future__ import annotations

import argparse
import math

from qcstream.dashboards import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WINDOW_SECONDS
from qcstream.settings import Settings


def cmd_dashboard(args: argparse.Namespace) -> int:
    from qcstream.dashboards.server import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"invalid --port {args.port}: expected 0 to 65535 (0 picks a free port)")
    if not (math.isfinite(args.window) and args.window > 0):
        raise ValueError(f"invalid --window {args.window}: expected a positive number of seconds, e.g. 3600")
    return serve(Settings.from_env(), host=args.host, port=args.port, window_seconds=args.window)


def add_dashboard_command(commands) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        help="serve the live web dashboard (defect rates, FNR/FPR, alerts, latest defects, lag)",
        description="Serve a web page with per-line defect rates, FNR and FPR over time with drift alerts, the "
        "latest defects with their anomaly maps, throughput and consumer lag. It reads $QCSTREAM_DATA_DIR, "
        "MinIO and Kafka with the QCSTREAM_* settings and refreshes every few seconds. Stop it with Ctrl-C.",
    )
    dashboard.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}). The page has no login, so keep it local")
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT}, and 0 picks a free one)")
    dashboard.add_argument("--window", type=float, default=DEFAULT_WINDOW_SECONDS, help=f"time range of the charts in seconds (default: {DEFAULT_WINDOW_SECONDS:.0f})")
    dashboard.set_defaults(func=cmd_dashboard)
