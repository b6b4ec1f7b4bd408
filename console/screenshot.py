"""``python -m console.screenshot``: a PNG of a console page, as the README's picture is made.

    make demo && python -m console.screenshot --registry demo-output/registry \\
        --runs demo-output --page / --out docs/console-budget.png

Starts the console on a free 127.0.0.1 port in this process, has headless Chromium take the
screenshot, and stops the server.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

from fedgov.errors import FedgovError


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m console.screenshot",
        description="Save a PNG screenshot of one page of the governance console.",
    )
    parser.add_argument("--registry", required=True, help="the registry folder")
    parser.add_argument("--runs", required=True, help="folder holding run outputs")
    parser.add_argument("--page", default="/", help="the page's path (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=1100, help="pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        import uvicorn

        from console.app import create_app
        from console.cli import check_sources
        from console.pages import Sources
        from console.pdf import screenshot

        registry, runs = check_sources(args.registry, args.runs)
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(Sources(registry, runs)),
                host="127.0.0.1",
                port=port,
                log_level="warning",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise FedgovError("the console did not start within 60 s")
            time.sleep(0.05)
        try:
            url = f"http://127.0.0.1:{port}{args.page}"
            import httpx

            httpx.get(url, timeout=600)  # warm: the first load re-verifies every receipt
            screenshot(url, Path(args.out).resolve(), args.width, args.height)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    except FedgovError as error:
        print(f"console.screenshot: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
