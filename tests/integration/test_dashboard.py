"""The dashboard in headless Chromium, on the data of a real pipeline run.

The real worker (Kafka, MinIO, Parquet) inspects a few tire frames, an audit
station labels them, and two drift alert records are written to Parquet. The
worker then stops and two more frames wait in Kafka, so the consumer lag is known.
`qcstream dashboard` runs as a subprocess with the same settings, and Selenium
drives Debian's Chromium through /usr/bin/chromedriver (`make browser` installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.settings import ENV_PREFIX, Settings
from qcstream.storage.parquet_sink import ParquetSink
from qcstream.storage.queries import connect
from qcstream.streams.labels import LabelPublisher, label_from_mask
from qcstream.streams.producer import FrameProducer
from qcstream.streams.records import Alert, InspectionResult, Label
from qcstream.streams.topics import ensure_topics

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TIRE_TEST = REPO_ROOT.parent / "shared" / "data" / "mvtec3d_tire" / "test"
if not TIRE_TEST.is_dir():
    pytest.skip(f"real tire frames not found at {TIRE_TEST}", allow_module_level=True)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `make browser`", allow_module_level=True)

#: (line, defect type, file) of the real frames sent. The test adds a painted frame on line-a.
REAL_FRAMES = [
    ("line-a", "good", "002.png"),
    ("line-a", "cut", "000.png"),
    ("line-b", "hole", "000.png"),
    ("line-b", "good", "004.png"),
    ("line-a", "contamination", "000.png"),
    ("line-b", "good", "006.png"),
]
#: Frames sent after the worker stopped: the consumer lag that the page must show.
WAITING_FRAMES = 2
WINDOW_SECONDS = 600
#: Seconds between the capture times of the frames, so that they fall in different buckets.
CAPTURE_SPACING_S = 40.0
#: Bucket size of a 600 s window: 30 s is the smallest size that gives at most 30 buckets.
BUCKET_SECONDS = 30
SCREENSHOT = REPO_ROOT / "docs" / "images" / "dashboard.png"
WAIT_S = 30.0


@pytest.fixture
def settings(pipeline_settings, fitted_model_dir: Path) -> Settings:
    return pipeline_settings(fitted_model_dir)


@pytest.fixture
def dashboard(settings: Settings, tmp_path: Path):
    """Yield a function that starts `qcstream dashboard` on a free port, and its log path.

    The function returns the process and the URL. Every started dashboard is stopped by its pid afterwards.
    """
    log_path = tmp_path / "dashboard.log"
    command = [sys.executable, "-m", "qcstream.cli", "dashboard", "--port", "0", "--window", str(WINDOW_SECONDS)]
    processes: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, str]:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, env=dashboard_env(settings), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        processes.append(process)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            match = re.search(r"qcstream dashboard: (http://127\.0\.0\.1:\d+/)", log_path.read_text(errors="replace"))
            if match:
                return process, match.group(1)
            assert process.poll() is None, f"dashboard exited with {process.returncode}:\n{log_path.read_text()}"
            time.sleep(0.2)
        raise AssertionError(f"dashboard printed no URL within {WAIT_S} s:\n{log_path.read_text()}")

    yield start, log_path
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium with a fresh profile and no background traffic, driven by Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900",
    ):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


def dashboard_env(settings: Settings) -> dict[str, str]:
    """Return this environment with the ``QCSTREAM_*`` variables replaced by those of ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.update(settings.to_env())
    return env


def painted_frame() -> np.ndarray:
    """Return a good tire photo with a saturated red square: the small test model flags it."""
    rgb = np.asarray(Image.open(TIRE_TEST / "good" / "rgb" / "000.png").convert("RGB")).copy()
    rgb[150:250, 100:200] = (255, 0, 0)
    return rgb


def view_count(settings: Settings, view: str) -> int:
    with connect(settings.data_dir) as connection:
        return connection.execute(f"SELECT count(*) FROM {view}").fetchone()[0]


def wait_for_rows(settings: Settings, view: str, expected: int, worker) -> None:
    deadline = time.monotonic() + 60.0
    while view_count(settings, view) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert view_count(settings, view) == expected, worker.log_tail()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def chart_count(driver, selector: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length", selector)


def test_dashboard_shows_pipeline_run(settings: Settings, start_worker, collect_messages, dashboard, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # --- a real pipeline run: frames, results, labels -------------------------------
    ensure_topics(settings)
    worker = start_worker(settings)
    # The capture times lie 40 s apart in the last minutes, as if the lines had been
    # running, so the charts have several time buckets. The worker inspects the frames now.
    first_capture = time.time() - CAPTURE_SPACING_S * (len(REAL_FRAMES) + 1)
    truth: dict[str, tuple[str, bool, str]] = {}  # frame id -> (line, labelled defect, defect type)
    with FrameProducer(settings) as producer:
        for index, (line_id, kind, name) in enumerate(REAL_FRAMES):
            ref = producer.send_frame(
                TIRE_TEST / kind / "rgb" / name, line_id=line_id, camera_id="cam-1",
                captured_at=first_capture + index * CAPTURE_SPACING_S,
            )
            is_defect = label_from_mask(ref.frame_id, line_id, TIRE_TEST / kind / "gt" / name).is_defect
            truth[ref.frame_id] = (line_id, is_defect, kind)
        painted = producer.send_frame(
            painted_frame(), line_id="line-a", camera_id="cam-2",
            captured_at=first_capture + len(REAL_FRAMES) * CAPTURE_SPACING_S,
        )
        truth[painted.frame_id] = ("line-a", True, "paint")

    messages = collect_messages(settings, worker, expected_results=len(truth), expected_letters=0)
    results = {r.frame_id: r for r in map(InspectionResult.loads, (m.value for m in messages[settings.topic_results]))}
    assert sorted(results) == sorted(truth), worker.log_tail()
    assert results[painted.frame_id].is_defect, "the painted frame must be flagged, so the page lists a defect"

    with LabelPublisher(settings) as publisher:
        for frame_id, (line_id, is_defect, kind) in truth.items():
            publisher.send(Label(frame_id=frame_id, line_id=line_id, is_defect=is_defect, labelled_at=time.time(), defect_type=kind if is_defect else None))
        publisher.flush()
    wait_for_rows(settings, "results", len(truth), worker)
    wait_for_rows(settings, "labels", len(truth), worker)

    # Drift alerts come from another part of the worker. This test writes two records of one episode.
    now = time.time()
    common = dict(
        condition="fnr-drift", recent_defects=3, recent_misses=2, baseline_defects=20, baseline_misses=2,
        recent_fnr=2 / 3, baseline_fnr=0.1, p_value=0.004, message="line-a FNR 0.67 against baseline 0.10",
    )
    ParquetSink(settings.data_dir, "alerts").write_batch([
        Alert(alert_id="drift-test-1", line_id="line-a", state="firing", raised_at=now - 60, **common),
        Alert(alert_id="drift-test-1", line_id="line-a", state="cleared", raised_at=now - 20, **common),
    ])

    # The worker commits its offsets when SIGTERM stops it, so the frames sent after that wait in Kafka.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, worker.log_tail()
    with FrameProducer(settings) as producer:
        for index in range(WAITING_FRAMES):
            producer.send_frame(TIRE_TEST / "good" / "rgb" / "008.png", line_id="line-b", camera_id=f"cam-w{index}")

    # --- the dashboard ---------------------------------------------------------------
    start_dashboard, log_path = dashboard
    process, url = start_dashboard()
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda driver: driver.execute_script("return document.body.dataset.loaded") == "true")

    # Per-line defect rate bars, with the counts made here from the results.
    wait.until(lambda driver: chart_count(driver, "#defect-rate-chart rect.bar") == 2)
    bar_lines = [element.get_attribute("data-line") for element in browser.find_elements(By.CSS_SELECTOR, "#defect-rate-chart rect.bar")]
    assert bar_lines == ["line-a", "line-b"]
    for line_id in ("line-a", "line-b"):
        frames = [r for r in results.values() if r.line_id == line_id]
        flagged = sum(r.is_defect for r in frames)
        label = browser.find_element(By.CSS_SELECTOR, f'#defect-rate-chart text.bar-label[data-line="{line_id}"]').text
        assert label == f"{100 * flagged / len(frames):.1f}% ({flagged} of {len(frames)})"
        bar = browser.find_element(By.CSS_SELECTOR, f'#defect-rate-chart rect.bar[data-line="{line_id}"]')
        assert float(bar.get_attribute("width")) > 0

    # FNR and FPR: one point per time bucket with labelled defects (FNR) or good parts (FPR).
    for line_id in ("line-a", "line-b"):
        chart = f'#rate-charts .rate-chart[data-line="{line_id}"]'
        defect_buckets = {int(results[f].captured_at // BUCKET_SECONDS) for f, (line, bad, _) in truth.items() if line == line_id and bad}
        good_buckets = {int(results[f].captured_at // BUCKET_SECONDS) for f, (line, bad, _) in truth.items() if line == line_id and not bad}
        assert defect_buckets, f"{line_id} needs a labelled defect for an FNR point"
        assert chart_count(browser, f"{chart} circle.point-fnr") == len(defect_buckets)
        assert chart_count(browser, f"{chart} circle.point-fpr") == len(good_buckets)
        assert chart_count(browser, f"{chart} path.series-fnr") == 1
        path = browser.find_element(By.CSS_SELECTOR, f"{chart} path.series-fnr").get_attribute("d")
        assert path.startswith("M")

    # The alert episode of line-a: a firing and a cleared marker on its chart, none on line-b.
    line_a = '#rate-charts .rate-chart[data-line="line-a"]'
    assert chart_count(browser, f'{line_a} g.alert-marker.alert-firing[data-alert-id="drift-test-1"]') == 1
    assert chart_count(browser, f'{line_a} g.alert-marker.alert-cleared[data-alert-id="drift-test-1"]') == 1
    assert chart_count(browser, '#rate-charts .rate-chart[data-line="line-b"] g.alert-marker') == 0
    assert browser.find_element(By.ID, "firing-value").text == "0"

    # Throughput, frames in the window and the consumer lag of the stopped worker's group.
    assert browser.find_element(By.ID, "frames-window-value").text == str(len(truth))
    assert re.fullmatch(r"\d+(\.\d)?", browser.find_element(By.ID, "throughput-value").text)
    wait.until(lambda driver: driver.find_element(By.ID, "lag-value").text == str(WAITING_FRAMES))
    lag = get_json(url + "api/lag")
    assert lag["topics"] == {settings.topic_frames: WAITING_FRAMES, settings.topic_labels: 0}
    assert settings.topic_labels in browser.find_element(By.ID, "lag-detail").text

    page_height = browser.execute_script("return document.body.scrollHeight + window.outerHeight - window.innerHeight")
    browser.set_window_size(1280, page_height + 16)
    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))

    # A click on the painted defect opens its overlay, served through the dashboard from MinIO.
    defect_button = browser.find_element(By.CSS_SELECTOR, f'#latest-defects button.defect[data-frame-id="{painted.frame_id}"]')
    defect_button.click()
    wait.until(lambda driver: driver.find_element(By.ID, "overlay-modal").is_displayed())
    image = browser.find_element(By.ID, "overlay-image")
    wait.until(lambda driver: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    assert image.get_attribute("src") == f"{url}api/overlay/{painted.frame_id}"
    width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert width == 300  # the tire frame's width; the caption band makes it taller than 400
    assert height > 400
    assert browser.find_element(By.ID, "overlay-error").is_displayed() is False
    assert browser.save_screenshot(str(tmp_path / "dashboard-overlay.png"))

    # Neither the page nor the API carries the MinIO secret key or an object key.
    summary_text = json.dumps(get_json(url + "api/summary"))
    assert len(settings.minio_secret_key) >= 8
    for text in (browser.page_source, summary_text, json.dumps(lag), log_path.read_text()):
        assert settings.minio_secret_key not in text
    assert results[painted.frame_id].anomaly_map_png_key not in summary_text

    if os.environ.get("QCSTREAM_KEEP_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT)

    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log_path.read_text()
