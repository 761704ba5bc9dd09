"""The GUI in a real headless browser (Debian's chromium + chromedriver) against the real daemon."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import base_config, wait_until

MiB = 1024 * 1024
CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path(os.environ.get("GUI_SCREENSHOT_DIR", "")) if os.environ.get("GUI_SCREENSHOT_DIR") else None

pytestmark = [pytest.mark.debian, pytest.mark.browser]


def make_browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: the GUI test needs Debian's chromium and chromium-driver "
                        "(.ci/run installs them: apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def add_model(fake, model_id, version_id, file_id, size, name, bps):
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[
        dict(id=version_id, published_at="2024-01-01T00:00:00.000Z",
             files=[dict(id=file_id, name=name, size_bytes=size, seed=model_id, primary=True)]),
    ])
    fake.set_fault(file_id, "drip", bps=bps)


def test_gui_login_live_download_and_cancel(fake_civitai, daemon_factory, tmp_path):
    from selenium.webdriver.common.by import By

    add_model(fake_civitai, 500, 5000, 50000, 3 * MiB, "dreamy-vision.safetensors", bps=1536 * 1024)
    add_model(fake_civitai, 501, 5010, 50100, 16 * MiB, "huge-model.safetensors", bps=256 * 1024)
    daemon = daemon_factory(base_config(fake_civitai, workers=2))
    daemon.start()
    token = daemon.token()
    browser = make_browser()
    try:
        browser.get(f"{daemon.base_url}/gui#token={token}")
        # The token leaves the address bar at once and stays in the browser.
        wait_until(lambda: "token" not in browser.current_url, 10, message="the token to leave the URL")
        assert browser.execute_script(
            "return localStorage.getItem('civitai-daemon.token') || sessionStorage.getItem('civitai-daemon.token')"
        ) == token
        wait_until(lambda: browser.find_element(By.ID, "conn").get_attribute("data-state") == "live", 15,
                   message="the live indicator")
        assert not browser.find_element(By.ID, "login").is_displayed()
        wait_until(lambda: "worker-1" in browser.find_element(By.ID, "procs").text, 15, message="the workers list")

        browser.find_element(By.CSS_SELECTOR, '#job-filter [data-filter="all"]').click()
        # Add a model through the form, by URL.
        browser.find_element(By.ID, "add-input").send_keys("https://civitai.com/models/500/dreamy-vision")
        browser.find_element(By.ID, "add-submit").click()
        job_id = wait_until(lambda: next((j["id"] for j in daemon.jobs() if j["model_id"] == 500), None), 10,
                            message="the job from the form")
        row = f'.job[data-job-id="{job_id}"]'
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, row), 10, message="the job row")
        # It is seen downloading, with a moving progress bar, then completed.
        wait_until(lambda: browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "downloading",
                   15, message="the row to show downloading")
        wait_until(lambda: "/s" in browser.find_element(By.CSS_SELECTOR, f"{row} .job-detail").text, 10,
                   message="a speed in the row")
        width = browser.find_element(By.CSS_SELECTOR, f"{row} .bar").value_of_css_property("width")
        assert width != "0px"
        wait_until(lambda: browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "done", 30,
                   message="the row to show completed")
        assert "dreamy-vision.safetensors" in browser.find_element(By.CSS_SELECTOR, row).text
        assert (daemon.models_dir / "checkpoint" / "dreamy-vision.safetensors").exists()

        # Another one, queued by REST, is cancelled from the GUI.
        other = daemon.api("POST", "/api/jobs", json={"model_id": 501}).json()["job"]
        other_row = f'.job[data-job-id="{other["id"]}"]'
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, other_row)
                   and browser.find_element(By.CSS_SELECTOR, other_row).get_attribute("data-state") == "downloading",
                   20, message="the second row to download")
        if SCREENSHOT_DIR:
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(SCREENSHOT_DIR / "gui-downloading.png"))
        browser.find_element(By.CSS_SELECTOR, f'{other_row} button[data-action="cancel"]').click()
        wait_until(lambda: browser.find_element(By.CSS_SELECTOR, other_row).get_attribute("data-state") == "cancelled",
                   10, message="the row to show cancelled")
        wait_until(lambda: daemon.job(other["id"])["state"] == "cancelled", 5, message="the job to be cancelled")
        assert browser.find_element(By.CSS_SELECTOR, f'{other_row} button[data-action="retry"]').is_displayed()

        # The event log shows what happened.
        browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="events"]').click()
        log_text = browser.find_element(By.ID, "events").text
        assert "download_completed" in log_text and "download_cancelled" in log_text
        if SCREENSHOT_DIR:
            browser.save_screenshot(str(SCREENSHOT_DIR / "gui-events.png"))
        errors = [e for e in browser.get_log("browser")
                  if e.get("level") == "SEVERE" and "favicon" not in e.get("message", "")]
        assert not errors, errors
    finally:
        browser.quit()
