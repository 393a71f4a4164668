"""The webhook sender against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import logging

import pytest

from qcstream.streams.webhook import WebhookError, post_json, redact


def test_post_json_retries_server_error(webhook_receiver):
    receiver = webhook_receiver([500, 201])
    status = post_json(receiver.url, {"state": "firing", "p_value": 0.001}, delays=(0.01, 0.01))

    assert status == 201
    assert receiver.bodies == [{"state": "firing", "p_value": 0.001}] * 2
    assert receiver.paths == ["/hooks/secret-token?key=hunter2"] * 2


def test_post_json_failure_hides_token(webhook_receiver, caplog: pytest.LogCaptureFixture):
    receiver = webhook_receiver([503, 503, 503])

    with caplog.at_level(logging.DEBUG), pytest.raises(WebhookError, match=r"after 3 tries: HTTP 503") as raised:
        post_json(receiver.url, {"state": "firing"}, delays=(0.01, 0.01))

    assert len(receiver.bodies) == 3
    port = receiver.server.server_address[1]
    assert f"webhook http://127.0.0.1:{port} " in str(raised.value)
    for text in (str(raised.value), caplog.text):
        assert "secret-token" not in text
        assert "hunter2" not in text


def test_redact_keeps_scheme_host_and_port_only():
    assert redact("https://hooks.example.com/services/T0/B1/xyz?token=1") == "https://hooks.example.com"
    assert redact("http://127.0.0.1:8080/a/b") == "http://127.0.0.1:8080"
