"""FNR drift alerting: a periodic check per line, and where its alerts go.

The worker's leader runs :meth:`DriftMonitor.check` on a Faust timer. For each
line it counts the recent and baseline labelled defects in the Parquet data
(:mod:`qcstream.storage.drift`) and tests whether the recent false-negative rate
is higher than the baseline's:

- not firing, and ``p < alert_p_value``: a ``firing`` alert is raised, and the
  baseline it was measured against is frozen for the episode, so a long drift
  does not become its own baseline;
- firing, and ``p > alert_clear_p_value`` against that frozen baseline: a
  ``cleared`` record with the same ``alert_id`` ends the episode;
- anything else, including a line with too few labelled defects: nothing new is
  sent, so a condition that persists is reported once.

An alert is written to the ``alerts`` Parquet data first, so that a restarted
worker can read which episodes are open. Then it is sent to the ``alerts`` topic, logged, and
posted to the webhook when one is configured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any, Callable

import faust

from qcstream.settings import Settings
from qcstream.storage.drift import DefectCounts, check_reference_fnr, fnr_drift_test, line_defect_counts, open_alerts
from qcstream.storage.parquet_mirror import ParquetMirror
from qcstream.storage.parquet_sink import ALERTS, ParquetSink
from qcstream.streams.records import Alert
from qcstream.streams.webhook import WebhookError, check_webhook_url, post_json, redact

logger = logging.getLogger(__name__)

CONDITION = "fnr-drift"


def check_alert_settings(settings: Settings) -> None:
    """Raise ValueError naming the variable when an alert setting is out of range."""
    if settings.alert_check_seconds < 0:
        raise ValueError(
            f"invalid QCSTREAM_ALERT_CHECK_SECONDS {settings.alert_check_seconds!r}: "
            "expected seconds between checks, or 0 to turn the check off"
        )
    for name in ("alert_recent_defects", "alert_baseline_defects", "alert_min_baseline_defects"):
        value = getattr(settings, name)
        if value < 1:
            raise ValueError(f"invalid QCSTREAM_{name.upper()} {value!r}: expected a positive number of labelled defects")
    if settings.alert_min_baseline_defects > settings.alert_baseline_defects:
        raise ValueError(
            f"invalid QCSTREAM_ALERT_MIN_BASELINE_DEFECTS {settings.alert_min_baseline_defects}: it is larger than "
            f"QCSTREAM_ALERT_BASELINE_DEFECTS {settings.alert_baseline_defects}, so no baseline could ever qualify"
        )
    if not 0 < settings.alert_p_value <= settings.alert_clear_p_value < 1:
        raise ValueError(
            f"invalid QCSTREAM_ALERT_P_VALUE {settings.alert_p_value!r} and QCSTREAM_ALERT_CLEAR_P_VALUE "
            f"{settings.alert_clear_p_value!r}: expected 0 < P_VALUE <= CLEAR_P_VALUE < 1, for example 0.01 and 0.1"
        )
    check_reference_fnr(settings.alert_reference_fnr)
    if settings.alert_webhook_url:
        check_webhook_url(settings.alert_webhook_url)


class DriftMonitor:
    """Decides, check after check, which lines start or end an FNR drift episode.

    ``counts`` defaults to reading the Parquet data under ``settings.data_dir``;
    unit tests pass their own function.
    """

    def __init__(
        self,
        settings: Settings,
        counts: Callable[[], list[DefectCounts]] | None = None,
        open_episodes: dict[str, Alert] | None = None,
    ) -> None:
        check_alert_settings(settings)
        self.settings = settings
        self._counts = counts or (
            lambda: line_defect_counts(settings.data_dir, settings.alert_recent_defects, settings.alert_baseline_defects)
        )
        #: Line id -> its firing alert, for lines with an open episode.
        self.firing: dict[str, Alert] = (
            dict(open_episodes) if open_episodes is not None else load_open_episodes(settings)
        )

    def check(self, now: float | None = None) -> list[Alert]:
        """Run one check over all lines (blocking) and return the new ``firing`` and ``cleared`` alerts.

        The open episodes change only when :meth:`record` is called with an alert
        that was delivered, so an alert that failed to go out is raised again.
        """
        now = time.time() if now is None else now
        alerts = []
        for counts in self._counts():
            alert = self._check_line(counts, now)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def _check_line(self, counts: DefectCounts, now: float) -> Alert | None:
        settings = self.settings
        if counts.recent_defects < settings.alert_recent_defects:
            logger.debug("line %s: %d labelled defects, the check needs %d", counts.line_id,
                         counts.recent_defects, settings.alert_recent_defects)
            return None

        episode = self.firing.get(counts.line_id)
        if episode is not None:
            # Test against the baseline frozen when the episode began.
            frozen = dataclasses.replace(
                counts, baseline_defects=episode.baseline_defects, baseline_misses=episode.baseline_misses
            )
            test = fnr_drift_test(frozen, min_baseline=1, reference_fnr=episode.baseline_fnr)
            if test is None or test.p_value <= settings.alert_clear_p_value:
                logger.debug("line %s: alert %s stays open, recent %d/%d missed, p = %s", counts.line_id,
                             episode.alert_id, counts.recent_misses, counts.recent_defects,
                             "n/a" if test is None else f"{test.p_value:.3g}")
                return None
            return _alert(episode.alert_id, "cleared", frozen, test.p_value, test.baseline_fnr, now)

        test = fnr_drift_test(counts, settings.alert_min_baseline_defects, settings.alert_reference_fnr)
        if test is None:
            logger.debug("line %s: baseline of %d labelled defects is too short and no reference FNR is set",
                         counts.line_id, counts.baseline_defects)
            return None
        logger.debug(
            "line %s: recent %d/%d missed against %s, p = %.3g", counts.line_id, counts.recent_misses,
            counts.recent_defects,
            f"reference FNR {test.baseline_fnr:.3f}" if test.against_reference
            else f"baseline {counts.baseline_misses}/{counts.baseline_defects}",
            test.p_value,
        )
        if test.p_value >= settings.alert_p_value or test.recent_fnr <= test.baseline_fnr:
            return None

        baseline = counts
        if test.against_reference:
            # Freeze the reference as the episode's baseline (no labelled history behind it).
            baseline = dataclasses.replace(counts, baseline_defects=0, baseline_misses=0)
        return _alert(uuid.uuid4().hex, "firing", baseline, test.p_value, test.baseline_fnr, now)

    def record(self, alert: Alert) -> None:
        """Open or close ``alert``'s episode, once the alert has been delivered."""
        if alert.state == "firing":
            self.firing[alert.line_id] = alert
        else:
            self.firing.pop(alert.line_id, None)


def _alert(alert_id: str, state: str, counts: DefectCounts, p_value: float, baseline_fnr: float, now: float) -> Alert:
    recent_fnr = counts.recent_misses / counts.recent_defects
    if state == "firing":
        message = (
            f"line {counts.line_id}: the detector missed {counts.recent_misses} of the last "
            f"{counts.recent_defects} labelled defects (FNR {recent_fnr:.2f}), against a baseline FNR of "
            f"{baseline_fnr:.2f} (p = {p_value:.2g})"
        )
    else:
        message = (
            f"line {counts.line_id}: cleared; the detector missed {counts.recent_misses} of the last "
            f"{counts.recent_defects} labelled defects (FNR {recent_fnr:.2f}), baseline FNR {baseline_fnr:.2f}"
        )
    return Alert(
        alert_id=alert_id,
        line_id=counts.line_id,
        condition=CONDITION,
        state=state,
        raised_at=now,
        recent_defects=counts.recent_defects,
        recent_misses=counts.recent_misses,
        baseline_defects=counts.baseline_defects,
        baseline_misses=counts.baseline_misses,
        recent_fnr=recent_fnr,
        baseline_fnr=baseline_fnr,
        p_value=p_value,
        message=message,
        window_start=counts.window_start,
        window_end=counts.window_end,
    )


def load_open_episodes(settings: Settings) -> dict[str, Alert]:
    """Return the firing alert of each line whose latest episode has no ``cleared`` record yet."""
    episodes = {row["line_id"]: Alert(**row) for row in open_alerts(settings.data_dir, CONDITION)}
    for line_id, alert in episodes.items():
        logger.info("line %s has an open FNR drift episode %s since %s", line_id, alert.alert_id,
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(alert.raised_at)))
    return episodes


def webhook_body(alert: Alert) -> dict[str, Any]:
    """Return the webhook's JSON body: the alert record, plus ``text`` for chat tools that show one field."""
    body = alert.to_dict()
    body["text"] = f"[qcstream {alert.state}] {alert.message}"
    return body


class AlertNotifier:
    """Sends each alert to Parquet, the ``alerts`` topic, the log and the optional webhook."""

    def __init__(self, settings: Settings, topic: faust.TopicT) -> None:
        self.settings = settings
        self.topic = topic
        self.sink = ParquetSink(settings.data_dir, ALERTS, ParquetMirror.from_settings(settings))

    async def notify(self, alert: Alert) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.sink.write_batch, [alert])
        await self.topic.send(key=alert.line_id.encode(), value=alert.dumps())

        if alert.state == "firing":
            logger.warning("FNR drift alert %s: %s", alert.alert_id, alert.message)
        else:
            logger.info("FNR drift alert %s cleared: %s", alert.alert_id, alert.message)

        url = self.settings.alert_webhook_url
        if url:
            try:
                status = await loop.run_in_executor(None, post_json, url, webhook_body(alert))
                logger.info("alert %s %s posted to webhook %s (HTTP %d)", alert.alert_id, alert.state, redact(url), status)
            except WebhookError as error:
                logger.error("alert %s %s: %s. The alert is still in the alerts topic and the Parquet data",
                             alert.alert_id, alert.state, error)


def register_alert_timer(app: faust.App, topics: Any, settings: Settings) -> None:
    """Add the FNR drift check to ``app`` as a timer on the leader worker, unless it is turned off."""
    if settings.alert_check_seconds == 0:
        logger.info("FNR drift check is off (QCSTREAM_ALERT_CHECK_SECONDS=0)")
        return
    # The monitor checks the settings and reads the open episodes from the Parquet data.
    monitor = DriftMonitor(settings)
    notifier = AlertNotifier(settings, topics.alerts)

    async def check_fnr_drift() -> None:
        loop = asyncio.get_running_loop()
        try:
            for alert in await loop.run_in_executor(None, monitor.check):
                await notifier.notify(alert)
                monitor.record(alert)
        except Exception:  # the worker must keep running; the next check tries again
            logger.exception("FNR drift check failed")

    app.timer(settings.alert_check_seconds, on_leader=True, name="check_fnr_drift")(check_fnr_drift)
    reference = (
        f"reference FNR {settings.alert_reference_fnr:g}" if settings.alert_reference_fnr is not None
        else "no reference FNR"
    )
    logger.info(
        "FNR drift check every %.0f s: last %d labelled defects per line against up to %d before them "
        "(at least %d, else %s), alert at p < %g, clear at p > %g%s; --log-level debug shows each line's test",
        settings.alert_check_seconds, settings.alert_recent_defects, settings.alert_baseline_defects,
        settings.alert_min_baseline_defects, reference, settings.alert_p_value, settings.alert_clear_p_value,
        f", webhook {redact(settings.alert_webhook_url)}" if settings.alert_webhook_url else "",
    )
