"""The web page at / in a real headless browser (Debian's chromium and chromedriver, driven by Selenium) against a
real server: translate with the keyboard, auto-detect, swap, errors, a file with its job's progress, a phone-sized
window. With LANDERMT_SCREENSHOTS=DIR the screenshots are kept there (docs/figures holds the committed ones).

Skipped when chromium is not installed, unless LANDERMT_REQUIRE_BROWSER is set (CI sets it: .ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER) and not os.environ.get("LANDERMT_REQUIRE_BROWSER"):
    pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tests.test_server import TEXTS  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,860"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("LANDERMT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def wait_for(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def api(server: str, q: str, source: str, target: str) -> dict:
    """The API's answer to what the page asks: the translation and up to 3 alternatives (a beam of 4)."""
    return httpx.post(f"{server}/translate", json={"q": q, "source": source, "target": target, "alternatives": 3},
                      timeout=120).json()


def test_translate_detect_swap_and_errors(server, browser):
    browser.get(server + "/")
    wait_for(browser, lambda d: len(Select(d.find_element(By.ID, "source")).options) == 7)  # auto + 6 languages
    assert Select(browser.find_element(By.ID, "target")).first_selected_option.get_attribute("value") == "ar"
    assert browser.find_element(By.ID, "limit").text == "200"
    text = browser.find_element(By.ID, "text")
    Select(browser.find_element(By.ID, "source")).select_by_value("en")
    Select(browser.find_element(By.ID, "target")).select_by_value("de")
    text.send_keys(TEXTS["en"])
    text.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard alone translates
    result = browser.find_element(By.ID, "result")
    answer = api(server, TEXTS["en"], "en", "de")
    expected = answer["translatedText"]
    wait_for(browser, lambda d: result.text not in ("", "…"))
    assert result.text == expected.strip() and browser.find_element(By.ID, "count").text == str(len(TEXTS["en"]))
    shown = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#alternatives li")]
    assert shown == [text.strip() for text in answer["alternatives"]]
    screenshot(browser, "web_page")

    browser.find_element(By.ID, "swap").click()  # de -> en, the translation becomes the text
    assert Select(browser.find_element(By.ID, "source")).first_selected_option.get_attribute("value") == "de"
    assert text.get_attribute("value") == expected.strip() and result.text == ""

    text.clear()
    text.send_keys(TEXTS["fr"])
    Select(browser.find_element(By.ID, "source")).select_by_value("auto")
    browser.find_element(By.ID, "translate").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "detected").text.startswith("Detected: fr"))
    wait_for(browser, lambda d: result.text == api(server, TEXTS["fr"], "fr", "en")["translatedText"].strip())

    text.clear()
    text.send_keys("12345")
    browser.find_element(By.ID, "translate").click()
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda d: "cannot detect the language" in error.text)
    assert result.text == ""


def test_file_translation_shows_progress_and_a_download(server, browser, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(f"{TEXTS['en']}\n\nWhere is the station?\n")
    browser.get(server + "/")
    wait_for(browser, lambda d: len(Select(d.find_element(By.ID, "source")).options) == 7)
    Select(browser.find_element(By.ID, "source")).select_by_value("en")
    Select(browser.find_element(By.ID, "target")).select_by_value("fr")
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "translate-file").click()
    link = browser.find_element(By.ID, "file-link")
    wait_for(browser, lambda d: link.is_displayed())
    assert link.get_attribute("download") == "notes_fr.txt" and link.text == "Download notes_fr.txt"
    assert browser.find_element(By.ID, "file-status").text == "completed: 2 of 2 segments"
    assert browser.find_element(By.ID, "file-progress").get_attribute("value") == "1"


def test_phone_sized_window_stacks_the_panes(server, browser):
    browser.set_window_size(390, 844)
    try:
        browser.get(server + "/")
        wait_for(browser, lambda d: len(Select(d.find_element(By.ID, "source")).options) == 7)
        text, result = browser.find_element(By.ID, "text"), browser.find_element(By.ID, "result")
        assert result.location["y"] > text.location["y"] + text.size["height"] - 1  # one column
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
        screenshot(browser, "web_page_phone")
    finally:
        browser.set_window_size(1200, 860)
