"""Run the inspection worker in this process until SIGTERM or SIGINT.

Start as many worker processes as the ``frames`` topic has partitions; Kafka shares
the partitions among them. Each needs its own web port (``QCSTREAM_WORKER_WEB_PORT``).
"""

from __future__ import annotations

import logging

from qcstream.settings import Settings
from qcstream.storage.objects import ObjectStore
from qcstream.streams.alerts import check_alert_settings
from qcstream.streams.app import create_app
from qcstream.streams.inspect import load_model
from qcstream.streams.topics import ensure_topics

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Load the model, make sure buckets and topics exist, and run the Faust worker.

    Returns after a clean stop. Raises ValueError for an alert setting out of range, and
    :class:`~qcstream.streams.inspect.ModelNotFoundError` when ``settings.model_dir``
    contains no fitted model.
    """
    check_alert_settings(settings)
    detector = load_model(settings.model_dir)
    logger.info("loaded model version %s from %s", detector.version, settings.model_dir)

    ObjectStore(settings).ensure_buckets(settings.bucket_frames, settings.bucket_maps)
    ensure_topics(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.home.mkdir(parents=True, exist_ok=True)

    app = create_app(settings, detector)
    # Faust's worker sets up logging, installs the SIGTERM and SIGINT handlers that
    # stop it cleanly, and ends with SystemExit once the event loop is closed.
    worker = app.Worker(loglevel=loglevel, quiet=True)
    logger.info("starting worker: Kafka %s, web port %d on 127.0.0.1", settings.kafka_bootstrap, settings.worker_web_port)
    try:
        worker.execute_from_commandline()
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    logger.info("worker stopped")
