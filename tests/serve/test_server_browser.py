"""The page of `loraqa serve` in a real headless Chromium (Debian's chromium + chromium-driver,
driven by selenium): paste a passage, ask two questions in a row, read the answers.

LORAQA_SCREENSHOT=docs/serve.png saves the screenshot there (else under tmp_path)."""

import os
import shutil
from pathlib import Path

import pytest

from loraqa.data.examples import Example
from loraqa.inference.answerer import ask, load_answerer
from loraqa.serve.app import build_app
from conftest import start_server

PASSAGE = ("Super Bowl 50 was an American football game to determine the champion of the National Football "
           "League (NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos "
           "defeated the National Football Conference (NFC) champion Carolina Panthers 24-10.")
QUESTIONS = ["Which team won Super Bowl 50?", "Who lost?"]


def _browser():
    """A headless Chromium driver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs a Chromium and its driver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,820"):
        options.add_argument(arg)
    try:
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    except Exception as e:  # a browser that cannot start here (no display libraries, ...) is a skip, said why
        pytest.skip(f"headless Chromium did not start: {str(e).splitlines()[0]}")


def test_the_page_answers_questions_in_a_row(tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from loraqa.config import load_config

    config = load_config(None, {"model": str(tiny_model_dir), "precision": "fp32", "max_new_tokens": 5})
    examples = [Example(str(i), "", PASSAGE, q, ()) for i, q in enumerate(QUESTIONS)]
    expected = ask(config, None, examples)
    browser = _browser()
    url, stop = start_server(build_app(load_answerer(config, None, examples)))
    try:
        browser.get(url)
        browser.find_element(By.ID, "context").send_keys(PASSAGE)
        for i, question in enumerate(QUESTIONS):
            browser.find_element(By.ID, "question").send_keys(question, Keys.ENTER)  # Enter asks
            WebDriverWait(browser, 30).until(
                lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history li")) == i + 1)
            answer = browser.find_element(By.ID, "answer").text
            assert answer == (expected[str(i)] or "(no answer)")
            assert browser.find_element(By.ID, "seconds").text.endswith(" s)")
            assert browser.find_element(By.ID, "question").get_attribute("value") == ""  # ready for the next
        assert browser.find_element(By.ID, "context").get_attribute("value") == PASSAGE  # the passage stays
        shot = Path(os.environ.get("LORAQA_SCREENSHOT") or tmp_path / "serve.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    finally:
        browser.quit()
        stop()


def test_the_page_asks_for_the_key_once_and_sends_it(tiny_model_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from loraqa.config import load_config
    from loraqa.serve.access import Access, host_names

    config = load_config(None, {"model": str(tiny_model_dir), "precision": "fp32", "max_new_tokens": 5})
    examples = [Example(str(i), "", PASSAGE, q, ()) for i, q in enumerate(QUESTIONS)]
    expected = ask(config, None, examples)
    browser = _browser()
    access = Access("s3cret", host_names("127.0.0.1", []))
    url, stop = start_server(build_app(load_answerer(config, None, examples), access=access))
    try:
        browser.get(url)
        browser.find_element(By.ID, "context").send_keys(PASSAGE)
        browser.find_element(By.ID, "question").send_keys(QUESTIONS[0], Keys.ENTER)
        prompt = WebDriverWait(browser, 30).until(expected_conditions.alert_is_present())  # the 401 asks
        prompt.send_keys("s3cret")
        prompt.accept()
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history li")) == 1)
        assert browser.find_element(By.ID, "answer").text == (expected["0"] or "(no answer)")
        browser.find_element(By.ID, "question").send_keys(QUESTIONS[1], Keys.ENTER)  # no second prompt
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history li")) == 2)
        assert browser.find_element(By.ID, "answer").text == (expected["1"] or "(no answer)")
    finally:
        browser.quit()
        stop()
