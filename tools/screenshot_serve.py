"""The README's picture of `latentdiff serve`: the shipped model served on a free port, two prompts generated
through the page in headless Chromium (Debian's), the page saved as a PNG.

    python tools/screenshot_serve.py docs/serve.png
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright


def main(out: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "latentdiff.cli", "serve", "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(url)
            page.wait_for_function("document.querySelector('#sampler_name').options.length > 1")
            for prompt, seed, figures in (("a tiger", "0", 4), ("a red apple", "0", 8)):
                page.fill("#prompt", prompt)
                page.fill("#batch_size", "4")
                page.fill("#seed", seed)
                page.click("#generate")
                page.locator("#gallery figure img").nth(figures - 1).wait_for()
            page.screenshot(path=out)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {out} ({Path(out).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/serve.png")
