"""Settings from the environment: alert settings, round trips and errors that name the variable."""

from __future__ import annotations

import dataclasses
import os

import pytest

from qcstream.settings import ENV_PREFIX, Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv(ENV_PREFIX + "HOME", str(tmp_path / "home"))
    return monkeypatch


def test_alert_defaults(clean_env):
    settings = Settings.from_env()

    assert settings.topic_alerts == "alerts"
    assert settings.alert_check_seconds == 60.0
    assert (settings.alert_recent_defects, settings.alert_baseline_defects, settings.alert_min_baseline_defects) == (20, 200, 20)
    assert settings.alert_reference_fnr is None
    assert (settings.alert_p_value, settings.alert_clear_p_value) == (0.01, 0.1)
    assert settings.alert_webhook_url is None


def test_settings_round_trip_through_env(clean_env):
    changed = dataclasses.replace(
        Settings.from_env(), alert_reference_fnr=0.08, alert_webhook_url="http://127.0.0.1:1/hook/tok", alert_check_seconds=5.0
    )
    for name, value in changed.to_env().items():
        clean_env.setenv(name, value)

    assert Settings.from_env() == changed


def test_webhook_url_not_in_repr(clean_env):
    clean_env.setenv(ENV_PREFIX + "ALERT_WEBHOOK_URL", "https://hooks.example.com/T0/secret-token")

    assert "secret-token" not in repr(Settings.from_env())


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("KAFKA_PORT", "ninety", "invalid QCSTREAM_KAFKA_PORT 'ninety': expected a whole number such as 9092"),
        ("ALERT_P_VALUE", "1%", "invalid QCSTREAM_ALERT_P_VALUE '1%': expected a number such as 0.01"),
        ("ALERT_REFERENCE_FNR", "low", "invalid QCSTREAM_ALERT_REFERENCE_FNR 'low'"),
    ],
)
def test_bad_number_names_the_variable(clean_env, name: str, value: str, message: str):
    clean_env.setenv(ENV_PREFIX + name, value)

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Settings.from_env()
