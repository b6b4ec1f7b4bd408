"""HTML to PDF (and PNG screenshots) with headless Chromium (Debian's ``chromium`` package).

Chromium runs on a private temporary folder (profile, input page, output), deleted afterwards:
nothing is written anywhere else. ``make chromium`` installs the browser when absent.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from fedgov.errors import FedgovError

TIMEOUT_S = 120.0


def chromium_path() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def chromium_args(profile: Path) -> list[str]:
    """The headless flags: no sandbox (root in CI), no GPU, no network chatter."""
    binary = chromium_path()
    if binary is None:
        raise FedgovError(
            "chromium is not installed: the PDF needs headless Chromium (make chromium, or "
            "apt-get install chromium); the HTML statement is at the same URL without .pdf"
        )
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]


def html_to_pdf(html_text: str) -> bytes:
    """Print ``html_text`` (a self-contained page) to PDF bytes."""
    with tempfile.TemporaryDirectory(prefix="fedgov-console-pdf-") as tmp:
        folder = Path(tmp)
        page, out = folder / "statement.html", folder / "statement.pdf"
        page.write_text(html_text, encoding="utf-8")
        args = [
            *chromium_args(folder / "profile"),
            "--no-pdf-header-footer",
            f"--print-to-pdf={out}",
            page.as_uri(),
        ]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FedgovError(f"chromium did not print the PDF within {TIMEOUT_S:g} s") from None
        if result.returncode != 0 or not out.exists():
            tail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise FedgovError(f"chromium could not print the PDF ({tail})")
        return out.read_bytes()


def screenshot(url: str, out: Path, width: int = 1280, height: int = 1000) -> None:
    """Save a PNG screenshot of ``url`` (a page served on 127.0.0.1) to ``out``."""
    with tempfile.TemporaryDirectory(prefix="fedgov-console-shot-") as tmp:
        args = [
            *chromium_args(Path(tmp) / "profile"),
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            url,
        ]
        result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode != 0 or not out.exists():
            tail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise FedgovError(f"chromium could not take the screenshot of {url} ({tail})")


def dump_dom(url: str) -> str:
    """The DOM of ``url`` after Chromium loaded it (what a browser with JavaScript off shows)."""
    with tempfile.TemporaryDirectory(prefix="fedgov-console-dom-") as tmp:
        args = [*chromium_args(Path(tmp) / "profile"), "--dump-dom", url]
        result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise FedgovError(f"chromium could not load {url} ({tail})")
        return result.stdout
