"""Screenshots of the web page for the docs, from a running server (headless chromium, as in tests/test_web_page.py).

    python scripts/web_screenshots.py http://127.0.0.1:8000 [--text "The weather is nice today."]

Translates the text en→de on the page and writes docs/figures/web_page.png (desktop) and web_page_phone.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("SE_OFFLINE", "true")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--text", default="The weather is nice today. Where is the train station?")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,560"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(args.url.rstrip("/") + "/")
        WebDriverWait(driver, 60).until(lambda d: len(Select(d.find_element(By.ID, "source")).options) > 1)
        Select(driver.find_element(By.ID, "source")).select_by_value("auto")
        Select(driver.find_element(By.ID, "target")).select_by_value("de")
        driver.find_element(By.ID, "text").send_keys(args.text)
        driver.find_element(By.ID, "translate").click()
        result = driver.find_element(By.ID, "result")
        WebDriverWait(driver, 300).until(lambda d: result.text not in ("", "…"))
        FIGURES.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(FIGURES / "web_page.png"))
        driver.set_window_size(390, 844)
        driver.save_screenshot(str(FIGURES / "web_page_phone.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
