"""The console's HTTP layer (FastAPI): read-only pages, their JSON twins, a PDF, ``/metrics``.

Every page answers HTML by default and its JSON twin with ``?format=json`` or
``Accept: application/json``. Only GET (and HEAD) exist, so nothing can be written. With a
token, every request must carry it: ``Authorization: Bearer TOKEN``, or HTTP Basic auth with the
token as password (a browser asks for it, no JavaScript needed). A wrong token, a bad URL or bad
input is answered with one clear message, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from console import render
from console.pages import NotFound, Sources
from console.runs import REPORT_FILES, resolve_run_dir
from fedgov.errors import FedgovError

JSON_TYPE = "application/json"


def wants_json(request: Request) -> bool:
    """``?format=json``, or an Accept header preferring JSON to HTML."""
    if request.query_params.get("format") == "json":
        return True
    if request.query_params.get("format") == "html":
        return False
    accept = request.headers.get("accept", "")
    return JSON_TYPE in accept and "text/html" not in accept


def _answer(request: Request, data: dict[str, Any], html_of) -> Response:
    if wants_json(request):
        return JSONResponse(data)
    return HTMLResponse(html_of(data))


def _message(request: Request, status: int, message: str) -> Response:
    if wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    return HTMLResponse(render.message_page(message, status), status_code=status)


def token_ok(header: str, token: str) -> bool:
    """Whether an Authorization header carries ``token`` (Bearer, or Basic with it as password)."""
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), token.encode("utf-8"))


def create_app(sources: Sources, token: str | None = None, warm: bool = False) -> FastAPI:
    """The console over ``sources``; ``token`` protects every URL when given; ``warm`` starts
    re-verifying every run's receipts in the background at startup (the first page is faster)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if warm:
            threading.Thread(target=sources.runs, name="console-warm-up", daemon=True).start()
        yield

    app = FastAPI(
        title="fedgov console", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if token is not None and not token_ok(request.headers.get("authorization", ""), token):
            message = (
                "wrong or missing token: send 'Authorization: Bearer <the token in "
                "--token-file>' (in a browser: any user name, the token as password)"
            )
            response = _message(request, 401, message)
            response.headers["WWW-Authenticate"] = 'Basic realm="fedgov console"'
            return response
        return await call_next(request)

    @app.exception_handler(FedgovError)
    async def user_error(request: Request, error: FedgovError) -> Response:
        return _message(request, 404 if isinstance(error, NotFound) else 400, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            return _message(
                request, 404, f"no page at {request.url.path} (pages: /, /runs, /models)"
            )
        if error.status_code == 405:
            return _message(request, 405, "the console is read-only: only GET is answered")
        return _message(request, error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> Response:
        text = str(error).splitlines()[0] if str(error) else ""
        return _message(request, 500, f"internal error: {type(error).__name__}: {text}")

    @app.get("/")
    def federation(request: Request) -> Response:
        return _answer(request, sources.federation(), render.federation_html)

    @app.get("/runs")
    def runs(request: Request) -> Response:
        return _answer(request, sources.runs_page(), render.runs_html)

    @app.get("/runs/{rest:path}")
    def run(request: Request, rest: str) -> Response:
        key, marker, name = rest.rpartition("/files/")
        if marker:
            return _run_file(request, sources, key, name)
        return _answer(request, sources.run(rest), render.run_html)

    @app.get("/models")
    def models(request: Request) -> Response:
        return _answer(request, sources.models(), render.models_html)

    @app.get("/models/{name}/{version}")
    def version(request: Request, name: str, version: str) -> Response:
        return _answer(request, sources.version(name, _version(version)), render.version_html)

    @app.get("/models/{name}/{version}/statement")
    def statement(request: Request, name: str, version: str) -> Response:
        return _answer(request, sources.statement(name, _version(version)), render.statement_html)

    @app.get("/models/{name}/{version}/statement.pdf")
    def statement_pdf(request: Request, name: str, version: str) -> Response:
        from console.pdf import html_to_pdf

        data = sources.statement(name, _version(version))
        try:
            pdf = html_to_pdf(render.statement_html(data, standalone=True))
        except FedgovError as error:
            return _message(request, 503, str(error))
        filename = f"privacy-statement-{name}-{int(version)}.pdf"
        return Response(
            pdf,
            media_type="application/pdf",
            headers={"Content-Disposition": f'inline; filename="{filename}"'},
        )

    @app.get("/metrics")
    def metrics() -> Response:
        from console.metrics import exposition

        body, content_type = exposition(sources)
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    return app


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise NotFound(f"version '{text}' is not a whole number (e.g. /models/NAME/1)") from None
    return value


def _run_file(request: Request, sources: Sources, key: str, name: str) -> Response:
    """One of the run's report files (read-only); the privacy report re-rendered with a fresh
    verification, so a changed file can never show a stale 'verified'."""
    run_dir = resolve_run_dir(sources.runs_root, key)
    if run_dir is None:
        raise NotFound(f"no run '{key}' under {sources.runs_root} (see /runs)")
    if name in ("privacy_report.html", "privacy_report.md"):
        return _fresh_report(run_dir, name)
    if name not in REPORT_FILES:
        raise NotFound(f"run {key} has no file '{name}' (files: {', '.join(REPORT_FILES)})")
    path = Path(run_dir) / name
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise NotFound(f"{path}: cannot be read ({error.strerror or error})") from None
    media = "image/png" if name.endswith(".png") else JSON_TYPE
    return Response(payload, media_type=media)


def _fresh_report(run_dir: Path, name: str) -> Response:
    from privacy.report import render_html, render_markdown, summary_paragraph, verify_report

    path = run_dir / "privacy_report.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        document["verification"] = verify_report(document)
        document["summary"] = summary_paragraph(document)
    except OSError as error:
        raise NotFound(f"{path}: cannot be read ({error.strerror or error})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise FedgovError(
            f"{path}: malformed privacy report ({type(error).__name__}: {error})"
        ) from None
    if name.endswith(".md"):
        return PlainTextResponse(render_markdown(document), media_type="text/markdown")
    return HTMLResponse(render_html(document))
