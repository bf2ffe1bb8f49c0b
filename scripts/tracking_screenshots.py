"""Screenshots of a study's MLflow workspace for docs/tracking.md, taken in headless
Chromium (Debian's `chromium` package; Playwright drives it, without a browser of its own).

    apt-get install -y chromium && .venv/bin/pip install -e ".[docs]"
    .venv/bin/python scripts/tracking_screenshots.py --experiment smoke --out docs/img/tracking

It starts `mlflow server` on 127.0.0.1 for the store ($MLFLOW_TRACKING_URI, else
./mlflow.db), opens the experiment as a model-training workspace, and saves: the runs
table with the sweep expanded and its summary metrics as columns (runs.png), the chart
view comparing runs (charts.png), one child run's summary metrics and tags (run.png), its
speedup-against-heads curve (curve.png) and one of its plots (plot.png).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited; see {log}")
            time.sleep(2)
    proc.terminate()
    raise SystemExit(f"mlflow server did not answer within 300 s; see {log}")


def pick_runs(uri: str, experiment: str) -> tuple[str, str | None, str | None]:
    """The experiment's id, its latest sweep run and a child run with a decoding bench."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    parents = client.search_runs([exp.experiment_id], "tags.sweep_parent = 'true'", order_by=["attributes.start_time DESC"])
    parent = parents[0].info.run_id if parents else None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.run_name DESC"])
    bench = [r for r in runs if any(k.startswith("speedup/") for k in r.data.metrics)]
    child = (bench or [r for r in runs if r.info.run_id != parent] or [None])[0]
    return exp.experiment_id, parent, child.info.run_id if child else None


def settle(page, seconds: float = 4.0) -> None:
    page.wait_for_timeout(seconds * 1000)


def filter_by(page, placeholder: str, text: str) -> None:
    """Types `text` into the view's search box, where this MLflow version has one."""
    search = page.get_by_placeholder(placeholder)
    if search.count():
        search.first.fill(text)
        settle(page, 4)


def close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant panel beside every page; it is not part of the study."""
    for label in ("Close", "close"):
        button = page.locator(f"[aria-label='{label}']").last
        if button.count():
            try:
                button.click(timeout=3000)
                return
            except Exception:
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="smoke")
    p.add_argument("--out", type=Path, default=Path("docs/img/tracking"))
    p.add_argument("--width", type=int, default=1500)
    p.add_argument("--height", type=int, default=800)
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    exp_id, parent, child = pick_runs(uri, args.experiment)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(uri, port, args.out / "server.log")
    base = f"http://127.0.0.1:{port}/#/experiments/{exp_id}"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            # the experiment as a model-training workspace: it opens on its runs
            page.goto(f"{base}?workflowType=machine_learning", timeout=180_000)
            page.get_by_text("Run Name").first.wait_for(timeout=180_000)
            settle(page)
            close_assistant(page)
            # MLflow's toolbar and tree have no labels to find them by: its icons' drawings
            expand = page.locator("svg:has(path[d^='M7.25 7.25V4.5'])")  # the plus-square of a parent run
            for i in range(expand.count()):
                expand.nth(i).click()
                settle(page, 1)
            # the summary metrics as columns, in place of attributes a study does not use
            page.get_by_role("button", name="Columns").click()
            for attribute in ("Dataset", "Source", "Models"):
                page.get_by_text(attribute, exact=True).last.click()
            page.get_by_placeholder("Search columns").fill("summary/")
            settle(page, 2)
            names = page.locator(".du-bois-light-tree-title")
            for text in [names.nth(i).inner_text() for i in range(names.count())]:
                if text.startswith("summary/"):
                    page.get_by_text(text, exact=True).first.click()
            page.keyboard.press("Escape")
            settle(page)
            page.screenshot(path=str(args.out / "runs.png"))
            # the chart view: runs compared metric by metric, summary metrics first
            page.locator("svg:has(path[d^='M1 1v13.25'])").first.click()
            settle(page, 8)
            filter_by(page, "Search metric charts", "summary/")
            page.screenshot(path=str(args.out / "charts.png"))
            if child:
                page.goto(f"{base}/runs/{child}?workflowType=machine_learning")
                page.get_by_text("Metrics").first.wait_for(timeout=120_000)
                settle(page)
                close_assistant(page)
                page.get_by_placeholder("Search metrics").fill("summary/")
                settle(page, 2)
                page.screenshot(path=str(args.out / "run.png"))
                page.goto(f"{base}/runs/{child}/model-metrics?workflowType=machine_learning")
                settle(page, 8)
                filter_by(page, "Search", "speedup/")
                page.screenshot(path=str(args.out / "curve.png"))
                page.goto(f"{base}/runs/{child}/artifacts?workflowType=machine_learning")
                settle(page, 6)
                for name in ("bench", "plots"):
                    node = page.get_by_text(name, exact=True)
                    if node.count():
                        node.first.click()
                        settle(page, 2)
                pngs = page.get_by_text(".png")
                if pngs.count():
                    pngs.first.click()
                    settle(page, 5)
                page.screenshot(path=str(args.out / "plot.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.glob('*.png')))} in {args.out}")


if __name__ == "__main__":
    main()
