"""The live web dashboard served by ``qcstream dashboard``.

This module imports nothing heavy, so the command-line tool can read the defaults
below without loading aiohttp, DuckDB or Kafka.
"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
#: Time range of the charts, in seconds.
DEFAULT_WINDOW_SECONDS = 3600.0
