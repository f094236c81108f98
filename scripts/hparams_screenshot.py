"""Screenshot TensorBoard's HParams comparison of a tree of runs, in a real browser.

    python scripts/hparams_screenshot.py save/digits_table docs/tensorboard_hparams.png

Starts TensorBoard on a free localhost port, opens the HParams table in headless Chromium
(Playwright driving the system's /usr/bin/chromium: `apt install chromium`,
`pip install playwright`) and saves a PNG of it as a user first sees it: no column ticked or
unticked by hand (the runs mark student, teacher, method, alpha and beta as the leading
columns, engine/metrics_log.py). A documentation tool, not part of the package's dependencies.
"""
import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--port", str(port),
                               "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("TensorBoard did not start")


def screenshot(url: str, out: Path, browser_path: str) -> None:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2000, "height": 1100})
        page.goto(url)
        page.wait_for_selector("text=Trial ID", timeout=60000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out), full_page=False)
        browser.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("out")
    parser.add_argument("--browser", default="/usr/bin/chromium")
    opts = parser.parse_args(argv)
    port = free_port()
    server = start_tensorboard(opts.logdir, port)
    try:
        screenshot(f"http://127.0.0.1:{port}/?darkMode=false#hparams", Path(opts.out), opts.browser)
    finally:
        server.terminate()
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
