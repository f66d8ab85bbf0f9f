"""JupyterLab in a real browser: start a headless JupyterLab on a free local port, drive Debian's Chromium with
Playwright (nothing downloads a browser), and write screenshots of the viewers for the documentation.

    python scripts/lab_browser.py docs/images     # screenshots of the 2D and 3D viewer

The browser test (tests/test_browser.py) uses :func:`lab_page` and :func:`run_notebook` too. Chromium is
``$LMLIB_CHROMIUM`` or ``chromium`` on the PATH (Debian: ``apt-get install chromium``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Chromium on a machine without network: no background connections, no first-run dialogs (as root: no sandbox)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    """The Chromium executable, or None."""
    return os.environ.get("LMLIB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    if chromium() is None:
        return "no Chromium (apt-get install chromium, or set LMLIB_CHROMIUM to its executable)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no Playwright (pip install playwright; it drives the installed Chromium)"
    return None


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code cells on the ``python3`` kernel (the Python running JupyterLab)."""
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                     "source": src} for i, src in enumerate(cells)],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def lab_server(root: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """A headless JupyterLab serving ``root`` on a free local port; yields its base URL with the token."""
    port, token = _free_port(), secrets.token_hex(16)
    home = Path(tempfile.mkdtemp(prefix="lab-home-"))  # its own settings and workspaces: no dialogs from earlier runs
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"] + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
    news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about Jupyter news?" toast over the page
    log = (home / "server.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(home / 'server.log').read_text()[-2000:]}") from exc
                time.sleep(0.5)
        yield f"{base}|{token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def lab_page(root: Path, viewport: tuple[int, int] = (1400, 1000)) -> Iterator[tuple[Any, str]]:
    """A Chromium page and the JupyterLab base URL (``http://127.0.0.1:PORT|TOKEN``) serving ``root``."""
    from playwright.sync_api import sync_playwright

    with lab_server(root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.set_default_timeout(120_000)
            yield page, url
        finally:
            browser.close()


def open_notebook(page: Any, url: str, name: str) -> None:
    """Open ``name`` (relative to the served folder) and wait for its kernel."""
    base, token = url.split("|")
    page.goto(f"{base}/lab/tree/{name}?token={token}&reset")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=120_000)


def _run_all(page: Any) -> None:
    """Run every cell from the Run menu (no kernel restart dialog), then wait until the kernel is idle."""
    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_timeout(500)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=300_000)


def run_notebook(page: Any, url: str, name: str, shows: str | None = None, timeout_ms: float = 60_000) -> None:
    """Open ``name``, run all its cells and wait until the kernel is idle and, with ``shows``, until the last
    output area shows that text. A widget the page did not draw by then (JupyterLab's widget manager can miss
    the first messages of a kernel that has just started: "Loading widget..." stays) is run once more; after
    that an AssertionError quotes what the output shows (a traceback, a widget's text form) and the browser's
    console errors."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    errors: list[str] = []

    def console(msg: Any) -> None:
        if msg.type == "error":
            errors.append(msg.text)

    page.on("console", console)
    try:
        open_notebook(page, url, name)
        seen = []
        for _ in range(2):
            _run_all(page)
            if shows is None:
                return
            out = page.locator(".jp-Cell-outputArea").last
            try:
                out.get_by_text(shows).first.wait_for(timeout=timeout_ms)
                return
            except PlaywrightTimeout:  # look at what the output shows instead
                seen.append(out.inner_text(timeout=10_000) if out.count() else "(no output area)")
                if "Traceback" in seen[-1]:  # the cell failed ("Error displaying widget" is the race: run again)
                    break
        raise AssertionError(f"{name}: {shows!r} not shown after {len(seen)} run(s); the last output area shows:\n"
                             + "\n---\n".join(seen) + "\nbrowser console errors:\n" + "\n".join(errors[-20:]))
    finally:
        page.remove_listener("console", console)


def main(out_dir: str = "docs/images") -> None:
    """Screenshots of the comparison viewer in 2D and 3D (every method's test predictions) from the committed
    synthetic results (``results/synthetic2d``, ``results/synthetic3d``)."""
    why = missing()
    if why:
        raise SystemExit(f"cannot take screenshots: {why}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        load = ("from lmlib.reporting import comparison, viewer\n"
                "comp = comparison.load_comparison(r'{results}', '{dataset}', test_ids=comparison.current_test_ids("
                "'{dataset}', None))")
        shots = {f"viewer_{d[-2:]}.png": [load.format(results=REPO / "results", dataset=d),
                                          f"viewer.for_comparison(comp, '{d}')"] for d in ("synthetic2d", "synthetic3d")}
        with lab_page(root) as (page, url):
            for name, cells in shots.items():
                write_notebook(root / f"{Path(name).stem}.ipynb", cells)
                run_notebook(page, url, f"{Path(name).stem}.ipynb")
                output = page.locator(".jp-Notebook .jp-Cell").last.locator(".jp-Cell-outputArea")
                output.locator("img").first.wait_for()  # the figure drawn into the widget
                output.screenshot(path=str(out / name))
                print(f"wrote {out / name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
