"""The page at / in a real headless Chromium (Debian's chromium + chromedriver), with a fake microphone fed from a WAV.

The test holds the push-to-talk button until the page has heard 1.5 s, releases it, and waits
until the answer is done: the page must show the assistant's transcript, have received audio, and
show a time to first audio. Every wait is on a condition the page exposes, with a timeout.
``REEMPATHY_SCREENSHOT=PATH`` saves the page as it ends (how docs/serving-page.png is made).
"""

from __future__ import annotations

import os
import shutil
import wave
from pathlib import Path

import pytest
from serve_helpers import pcm16, running_server, voice, write_configs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    mic = tmp_path / "mic.wav"
    with wave.open(str(mic), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(pcm16(voice(3.0, 48000)))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,760",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_hears_the_microphone_and_shows_the_transcript_and_plays_the_answer(tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with running_server(write_configs(tmp_path / "serve", default_model="scripted")) as served:
        browser.get(served.http + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "scripted"
        button = browser.find_element(By.ID, "ptt")
        ActionChains(browser).click_and_hold(button).perform()
        wait.until(lambda d: int(d.find_element(By.ID, "captured").get_attribute("data-ms") or 0) >= 1500)
        ActionChains(browser).release(button).perform()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")

        user = browser.find_element(By.CSS_SELECTOR, "#transcript .turn.user .text").text
        answer = browser.find_element(By.CSS_SELECTOR, "#transcript .turn.assistant .text").text
        received = int(browser.find_element(By.ID, "audio-received").get_attribute("data-samples"))
        ttfa = browser.find_element(By.ID, "ttfa").get_attribute("data-ms")
        assert user == "(spoken)"
        assert answer.strip(), "the page shows no transcript of the answer"
        assert received > 0, "the page received no audio"
        assert ttfa and int(ttfa) > 0
        assert served.server.metrics.generated >= 6

        # The strategy picker and the reflections panel: ReEmpathy, asked in text, reflections shown as written.
        Select(browser.find_element(By.ID, "model")).select_by_value("reempathy")
        browser.find_element(By.ID, "reflections").click()
        browser.find_element(By.ID, "text").send_keys("I failed my driving test today and I feel stupid.\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#transcript .turn.assistant")) == 2
                   and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        meta = browser.find_elements(By.CSS_SELECTOR, "#transcript .turn.assistant .meta")[1].text
        reflections = browser.find_elements(By.CSS_SELECTOR, "#hidden .hidden-seg")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        screenshot = os.environ.get("REEMPATHY_SCREENSHOT")
        browser.save_screenshot(screenshot or str(tmp_path / "page.png"))
        assert "reempathy" in meta
        assert reflections and reflections[0].text.startswith("reflection 1:")
        assert browser.find_element(By.ID, "reflections-panel").is_displayed()
        assert not errors, errors
        assert Path(screenshot or tmp_path / "page.png").stat().st_size > 0
