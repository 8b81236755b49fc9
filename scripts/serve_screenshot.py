"""The screenshot of `loraqa serve`'s page in docs/: a real server (``python -m loraqa.cli serve``,
127.0.0.1, a free port) with the model and adapter given, driven by headless Chromium through
selenium: the first passage of the bundled evaluation sample, its first questions asked in a row.

    python scripts/serve_screenshot.py --model M --adapter runs/quickstart/lora/adapter --output docs/serve.png

Needs Debian's chromium and chromium-driver, and selenium (pip install '.[test]'). Bounded: the
server must answer /health within --deadline seconds; it is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--questions", type=int, default=3, help="questions asked about the passage")
    parser.add_argument("--output", default="docs/serve.png")
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from loraqa.data.load import sample_file
    from loraqa.data.squad import load_squad_file

    examples = load_squad_file(sample_file("eval"))
    passage = [ex for ex in examples if ex.context == examples[0].context][:args.questions]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "loraqa.cli", "serve", "--model", args.model, "--port", str(port)]
    command += ["--adapter", args.adapter] if args.adapter else []
    server = subprocess.Popen(command)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,940"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        deadline = time.monotonic() + args.deadline
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    print("health:", json.loads(response.read()), file=sys.stderr)
                    break
            except OSError:
                time.sleep(1)
        browser.get(url)
        browser.find_element(By.ID, "context").send_keys(passage[0].context)
        for i, ex in enumerate(passage):
            browser.find_element(By.ID, "question").send_keys(ex.question, Keys.ENTER)
            WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history li")) == i + 1)
            answer = browser.find_element(By.ID, "answer").text
            print(f"{ex.question} -> {answer} (gold: {' | '.join(dict.fromkeys(ex.answers))})", file=sys.stderr)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(args.output)
        print(f"saved {args.output}", file=sys.stderr)
    finally:
        browser.quit()
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
