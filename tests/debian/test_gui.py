"""The GUI in a real headless browser (Debian's chromium + chromedriver) against the real daemon."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ipc.store import JobStore
from tests.helpers import base_config, wait_until

MiB = 1024 * 1024
CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path(os.environ.get("GUI_SCREENSHOT_DIR", "")) if os.environ.get("GUI_SCREENSHOT_DIR") else None

pytestmark = [pytest.mark.debian, pytest.mark.browser]


def make_browser(width: int = 1400, height: int = 1000):
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
                f"--window-size={max(width, 500)},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    if width < 500:  # chromium's windows are at least 500 px wide: a phone's viewport is emulated
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
    return browser


def screenshot(browser, name: str) -> None:
    if SCREENSHOT_DIR:
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT_DIR / name))


def severe_errors(browser) -> list:
    return [e for e in browser.get_log("browser")
            if e.get("level") == "SEVERE" and "favicon" not in e.get("message", "")]


def png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    """A real PNG of one colour."""
    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class ImageHost:
    """A stand-in for image.civitai.com on loopback: serves one PNG, records each request's headers."""

    def __init__(self, body: bytes):
        self.body = body
        self.requests: list[dict] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                host.requests.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(host.body)))
                self.end_headers()
                self.wfile.write(host.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
        screenshot(browser, "gui-downloading.png")
        # Paused from its row once it has bytes: it stops and keeps them; resumed, it goes on.
        wait_until(lambda: (daemon.api("GET", f"/api/jobs/{other['id']}").json()["job"]["bytes_done"] or 0) > 0, 20,
                   message="the second download's first stored bytes")
        browser.find_element(By.CSS_SELECTOR, f'{other_row} button[data-action="pause"]').click()
        wait_until(lambda: daemon.job(other["id"])["state"] == "paused", 10, message="the job to be paused")
        wait_until(lambda: browser.find_element(By.CSS_SELECTOR, other_row).get_attribute("data-state") == "paused",
                   10, message="the row to show paused")
        assert "kept" in browser.find_element(By.CSS_SELECTOR, f"{other_row} .job-detail").text
        browser.find_element(By.CSS_SELECTOR, f'{other_row} button[data-action="resume"]').click()
        wait_until(lambda: daemon.job(other["id"])["state"] in ("queued", "downloading"), 10,
                   message="the job to be resumed")
        wait_until(lambda: browser.find_element(By.CSS_SELECTOR, other_row).get_attribute("data-state")
                   in ("queued", "downloading"), 10, message="the row to show it resumed")
        # Everything paused and resumed from the top bar; the page says so.
        browser.find_element(By.ID, "pause-all").click()
        wait_until(lambda: daemon.api("GET", "/api/status").json().get("paused") is True, 10,
                   message="the daemon to be paused")
        wait_until(lambda: browser.find_element(By.ID, "paused-banner").is_displayed(), 10,
                   message="the paused banner")
        assert browser.find_element(By.ID, "pause-all").text == "Resume all"
        browser.find_element(By.ID, "resume-all").click()
        wait_until(lambda: daemon.api("GET", "/api/status").json().get("paused") is False, 10,
                   message="the daemon to resume")
        wait_until(lambda: not browser.find_element(By.ID, "paused-banner").is_displayed(), 10,
                   message="the banner to go")
        browser.find_element(By.CSS_SELECTOR, f'{other_row} button[data-action="cancel"]').click()
        wait_until(lambda: browser.find_element(By.CSS_SELECTOR, other_row).get_attribute("data-state") == "cancelled",
                   10, message="the row to show cancelled")
        wait_until(lambda: daemon.job(other["id"])["state"] == "cancelled", 5, message="the job to be cancelled")
        assert browser.find_element(By.CSS_SELECTOR, f'{other_row} button[data-action="retry"]').is_displayed()

        # The event log shows what happened.
        browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="events"]').click()
        log_text = browser.find_element(By.ID, "events").text
        assert "download_completed" in log_text and "download_cancelled" in log_text
        screenshot(browser, "gui-events.png")
        errors = severe_errors(browser)
        assert not errors, errors
    finally:
        browser.quit()


def test_gui_job_row_shows_the_model_as_people_know_it(fake_civitai, daemon_factory):
    """From the moment the job is resolved the row names the model, its version and base model;
    once the file is verified its preview (fetched without the API key) is the row's thumbnail."""
    from selenium.webdriver.common.by import By

    image = png((200, 60, 40))
    host = ImageHost(image)
    try:
        fake_civitai.add_model(510, name="Dreamy Vision", type="LORA", versions=[dict(
            id=5100, name="v2.0", base_model="Pony", published_at="2024-01-01T00:00:00.000Z",
            trained_words=["dreamy", "soft light"],
            extra={"images": [{"url": f"{host.url}/x.mp4", "type": "video", "nsfwLevel": 1},
                              {"url": f"{host.url}/rated-r.png", "type": "image", "nsfwLevel": 4},
                              {"url": f"{host.url}/preview.png", "type": "image", "nsfwLevel": 1}]},
            files=[dict(id=51000, name="dreamy.safetensors", size_bytes=3 * MiB, seed=510, primary=True)])])
        fake_civitai.set_fault(51000, "drip", bps=1024 * 1024)
        key = "civitai-key-" + "k" * 20
        daemon = daemon_factory(base_config(fake_civitai, workers=1, civitai_api_key=key))
        daemon.start()
        browser = make_browser()
        try:
            browser.get(f"{daemon.base_url}/gui#token={daemon.token()}")
            wait_until(lambda: browser.find_element(By.ID, "conn").get_attribute("data-state") == "live", 15,
                       message="the live indicator")
            browser.find_element(By.CSS_SELECTOR, '#job-filter [data-filter="all"]').click()
            job = daemon.api("POST", "/api/jobs", json={"model_id": 510}).json()["job"]
            row = f'.job[data-job-id="{job["id"]}"]'
            wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, row)
                       and browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "downloading",
                       20, message="the row to download")
            # Named while it downloads, without a reload, and without a thumbnail yet.
            wait_until(lambda: browser.find_element(By.CSS_SELECTOR, f"{row} .job-name").text == "Dreamy Vision", 10,
                       message="the model's name in the row while it downloads (job JSON and events carry "
                               "model_name once the worker's resolved message has it)")
            sub = browser.find_element(By.CSS_SELECTOR, f"{row} .job-sub").text
            assert "v2.0" in sub and "Pony" in sub and "lora" in sub, sub
            assert not browser.find_elements(By.CSS_SELECTOR, f"{row} .thumb img")
            screenshot(browser, "gui-job-named.png")
            wait_until(lambda: browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "done", 30,
                       message="the row to show completed")
            src = wait_until(lambda: browser.execute_script(
                f"const i = document.querySelector('{row} .thumb img'); return i && i.complete && "
                f"i.naturalWidth > 0 && i.src"), 15,
                message="the thumbnail (the worker writes <stem>.preview.png after the verify)")
            assert src.startswith("blob:") and daemon.token() not in src
            screenshot(browser, "gui-job-thumbnail.png")
            folder = daemon.models_dir / "lora"
            assert (folder / "dreamy.preview.png").read_bytes() == image
            info = json.loads((folder / "dreamy.civitai.info").read_text())
            assert info["trainedWords"] == ["dreamy", "soft light"] and info["model"]["name"] == "Dreamy Vision"
            assert host.requests and all("authorization" not in r and "cookie" not in r for r in host.requests)
            assert not any(key in json.dumps(r) for r in host.requests)
            errors = severe_errors(browser)
            assert not errors, errors
        finally:
            browser.quit()
    finally:
        host.close()


def make_library(daemon, count: int) -> list[dict]:
    """`count` verified model files under lora/ with their sidecars, the manifest entries naming
    them and the database's record of their hashes: the daemon starts with nothing to fetch."""
    folder = daemon.models_dir / "lora"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    daemon.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(daemon.data_dir / "daemon.db")
    try:
        for i in range(count):
            name = f"model-{i:04d}.safetensors"
            data = f"weights of model {i}".encode()
            path = folder / name
            path.write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            st = path.stat()
            store.record_file(f"lora/{name}", sha, st.st_size, st.st_mtime_ns, 70000 + i)
            (folder / f"model-{i:04d}.civitai.info").write_text(json.dumps({
                "id": 70000 + i, "modelId": 7000 + i, "name": f"v{i % 4}.0", "baseModel": "SDXL 1.0",
                "trainedWords": [f"trigger{i}", "storybook"], "model": {"name": f"Library Model {i}", "type": "LORA"}}))
            if i % 3:
                (folder / f"model-{i:04d}.preview.png").write_bytes(png(((i * 37) % 256, (i * 91) % 256, 120)))
            entries.append({"modelId": 7000 + i, "modelVersionId": 70000 + i, "fileId": 700000 + i,
                            "model_type": "lora", "filename": name, "sha256": sha})
        store.set_kv("updater.last_success_ts", time.time())  # no update check of 1,000 unknown models at start
    finally:
        store.close()
    daemon.write_manifest(entries)
    return entries


def test_gui_library_with_a_thousand_entries(fake_civitai, daemon_factory, capsys):
    daemon = daemon_factory(base_config(fake_civitai, workers=1))
    make_library(daemon, 1000)
    daemon.start()
    assert daemon.api("GET", "/api/jobs").json()["jobs"] == []  # all present: nothing queued
    figures = {width: check_library(daemon, fake_civitai.origin, width) for width in (1400, 420)}
    with capsys.disabled():
        print("\nlibrary with 1,000 entries:", json.dumps(figures), "load average:", os.getloadavg())
    if SCREENSHOT_DIR:
        (SCREENSHOT_DIR / "library-1000-timing.json").write_text(json.dumps(figures, indent=2))


def check_library(daemon, site_origin: str, width: int) -> dict:
    """The library of make_library(…, 1000) in a window `width` px wide; returns the figures measured."""
    from selenium.webdriver.common.by import By

    token = daemon.token()
    browser = make_browser(width, 900)
    try:
        browser.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": daemon.base_url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        started = time.monotonic()
        browser.get(f"{daemon.base_url}/gui#token={token}")
        wait_until(lambda: browser.find_element(By.ID, "conn").get_attribute("data-state") == "live", 15,
                   message="the live indicator")
        clicked = time.monotonic()
        browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="library"]').click()
        timing = wait_until(lambda: browser.execute_script("return window.__libraryTiming"), 30,
                            message="the library to render")
        shown = time.monotonic()
        items = browser.find_elements(By.CSS_SELECTOR, "#library .lib-item")
        assert len(items) == 1000 and timing["entries"] == 1000
        # The rows on screen get their previews as blob URLs; the others wait until scrolled to.
        browser.execute_script("document.getElementById('library').scrollIntoView()")  # below the form when narrow
        wait_until(lambda: browser.execute_script(
            "return Array.from(document.querySelectorAll('#library .lib-item .thumb img'))"
            ".filter(i => i.complete && i.naturalWidth > 0).length") >= 3, 15, message="thumbnails")
        thumbs_at = time.monotonic()
        srcs = browser.execute_script(
            "return Array.from(document.querySelectorAll('#library .thumb img')).map(i => i.src)")
        assert srcs and all(s.startswith("blob:") for s in srcs)
        assert len(srcs) < 200, "previews of rows far off screen were fetched at once"
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
        assert not any(token in r for r in resources) and token not in browser.current_url
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width, \
            "the page is wider than the window"
        first = browser.find_element(By.CSS_SELECTOR, "#library .lib-item")
        assert "Library Model 0" in first.text and "v0.0" in first.text and "LORA" in first.text
        assert "SDXL 1.0" in first.text and "lora/" in first.text
        link = first.find_element(By.CSS_SELECTOR, ".lib-link").get_attribute("href")
        assert link == f"{site_origin}/models/7000?modelVersionId=70000"
        figures = {"navigation_to_live_s": round(clicked - started, 3),
                   "click_to_rendered_s": round(shown - clicked, 3),
                   "fetch_ms": round(timing["fetch_ms"], 1), "render_ms": round(timing["render_ms"], 1),
                   "first_thumbnails_s": round(thumbs_at - clicked, 3),
                   "dom_nodes": browser.execute_script("return document.getElementsByTagName('*').length")}
        screenshot(browser, f"gui-library-{width}.png")

        # A trigger word copies with a click.
        first.find_element(By.CSS_SELECTOR, '.word[data-copy="trigger0"]').click()
        wait_until(lambda: "Copied" in browser.find_element(By.ID, "toasts").text, 5, message="the copy toast")
        copied = browser.execute_async_script(
            "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('error: ' + e))")
        assert copied == "trigger0"

        # Search narrows the list at once; the state chips count.
        search = browser.find_element(By.ID, "lib-search")
        search.send_keys("trigger999")
        visible = browser.execute_script(
            "return Array.from(document.querySelectorAll('#library .lib-item')).filter(e => !e.hidden).length")
        assert visible == 1
        search.clear()
        search.send_keys("nothing like it")
        assert browser.find_element(By.ID, "library-empty").is_displayed()
        chip = browser.find_element(By.CSS_SELECTOR, '#lib-filter .chip[data-filter="present"]')
        assert chip.text.endswith("1000")
        bars = browser.find_elements(By.CSS_SELECTOR, "#space .space-row")
        assert len(bars) == 2 and "free of" in bars[0].text and "lora/" in bars[1].text
        errors = severe_errors(browser)
        assert not errors, errors
        return figures
    finally:
        browser.quit()


def test_gui_speed_cap_and_library_scan(fake_civitai, daemon_factory):
    """The speed cap set and cleared from the page; a scan started there adopts a known file and
    lists an unknown one."""
    from selenium.webdriver.common.by import By

    known = b"a model Civitai knows" * 1000
    fake_civitai.add_model(520, name="Known Lora", type="LORA", versions=[dict(
        id=5200, name="v1", published_at="2024-01-01T00:00:00.000Z",
        files=[dict(id=52000, name="known.safetensors", data=known, primary=True)])])
    daemon = daemon_factory(base_config(fake_civitai, workers=1, max_speed="20MB"))
    (daemon.models_dir / "Lora").mkdir(parents=True)
    (daemon.models_dir / "Lora" / "renamed-known.safetensors").write_bytes(known)
    (daemon.models_dir / "Lora" / "mystery.safetensors").write_bytes(b"nobody knows this one" * 100)
    daemon.start()
    browser = make_browser()
    try:
        browser.get(f"{daemon.base_url}/gui#token={daemon.token()}")
        wait_until(lambda: "20.0 MB/s" in browser.find_element(By.ID, "speed-info").text, 15,
                   message="the cap from config.json")
        speed = browser.find_element(By.ID, "speed-input")
        speed.clear()
        speed.send_keys("2.5")
        browser.find_element(By.ID, "speed-set").click()
        wait_until(lambda: daemon.api("GET", "/api/speed").json()["override"] == 2_500_000, 10,
                   message="the override to be set")
        wait_until(lambda: "set here" in browser.find_element(By.ID, "speed-info").text, 10,
                   message="the page to say where the cap comes from")
        browser.find_element(By.ID, "speed-clear").click()
        wait_until(lambda: daemon.api("GET", "/api/speed").json()["override"] is None, 10,
                   message="the override to be cleared")

        browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="library"]').click()
        browser.find_element(By.ID, "scan-start").click()
        wait_until(lambda: browser.find_element(By.ID, "scan").get_attribute("data-state") == "done", 60,
                   message="the scan to finish")
        result = browser.find_element(By.ID, "scan-result").text
        assert "1 matched" in result and "1 added" in result and "1 unknown" in result, result
        wait_until(lambda: "Known Lora" in browser.find_element(By.ID, "library").text, 10,
                   message="the adopted file in the library")
        screenshot(browser, "gui-scan.png")
        errors = severe_errors(browser)
        assert not errors, errors
    finally:
        browser.quit()
