"""Sending alerts to a webhook: one JSON POST per alert, retried a few times.

A webhook URL often carries its token in the path or the query, so logs and
errors name only the URL's scheme and host.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds to wait before each new try of a failed POST.
RETRY_DELAYS = (1.0, 3.0)
TIMEOUT_S = 5.0


class WebhookError(RuntimeError):
    """The webhook did not accept the alert after all tries."""


def check_webhook_url(url: str) -> str:
    """Return ``url`` if it is an http(s) URL with a host, else raise ValueError (without echoing the URL)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(
            f"invalid QCSTREAM_ALERT_WEBHOOK_URL (scheme {parts.scheme or 'missing'!r}): "
            "expected http://HOST/PATH or https://HOST/PATH"
        )
    return url


def redact(url: str) -> str:
    """Return ``scheme://host[:port]`` of ``url``: what logs may show of a webhook."""
    parts = urllib.parse.urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def post_json(url: str, body: dict[str, Any], timeout: float = TIMEOUT_S, delays: tuple[float, ...] = RETRY_DELAYS) -> int:
    """POST ``body`` as JSON to ``url`` (blocking); return the HTTP status, or raise :class:`WebhookError`.

    A 2xx status is success. Any other status, or no response, is retried after each of ``delays``.
    """
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    last_error = ""

    for attempt, delay in enumerate((*delays, None), start=1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as error:
            last_error = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            last_error = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason

        if delay is None:
            break
        logger.warning("webhook %s failed (attempt %d): %s; retrying in %.0f s", redact(url), attempt, last_error, delay)
        time.sleep(delay)

    raise WebhookError(f"webhook {redact(url)} did not accept the alert after {len(delays) + 1} tries: {last_error}")
