"""The annotation web app: FastAPI + Jinja2 pages, a few lines of JavaScript for the keys.

Pages:
- ``GET /``: the start page; a name (and optional group) -> ``POST /start`` sets a cookie with the
  name and opens the label page. ``/label?annotator=NAME`` works too (it sets the same cookie).
- ``GET /label``: the prompt and two responses side by side, buttons Left better / Right better /
  Tie / Skip (keys 1 / 2 / 0 / s), Undo (key u) and the progress count; ``/done`` when nothing is left.
- ``POST /label``: form fields ``annotator``, ``pair_id``, ``order`` (the left/right token the page
  was shown with: "ab" or "ba") and ``choice`` (left, right, tie, skip).
- ``POST /undo``: deletes the annotator's last label and shows that pair again.
- ``GET /healthz``: "ok" with the number of pairs (for scripts waiting for the server).

Every POST must come from this server's own pages: same Origin (or Referer) and the session token
the page's forms carry (``csrf_token``), else HTTP 403 and nothing changes (see security.py).
The name cookie holds the name percent-encoded (UTF-8), so names in every script work.

Bad input gets a clear HTTP error and changes nothing: 403 a cross-site request or a missing or
wrong session token; 413 a body over 64 KiB; 404 unknown pair id; 422 a missing form field,
an unknown choice or order token, or a bad name; 400 an order token that does not match the order
shown; 409 a second answer for the same pair, or an undo with nothing to undo.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, unquote

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from preftune.annotate.security import SESSION_COOKIE, CrossSiteError, Gate, Guard
from preftune.data.annotations import (
    AnnotationStore,
    DuplicateLabelError,
    InvalidLabelError,
    NothingToUndoError,
    OrderMismatchError,
    UnknownPairError,
    check_name,
)
from preftune.errors import PreftuneError

HERE = Path(__file__).parent
COOKIE = "preftune_annotator"
STATUS = {CrossSiteError: 403, UnknownPairError: 404, InvalidLabelError: 422, OrderMismatchError: 400,
          DuplicateLabelError: 409, NothingToUndoError: 409}
TITLES = {400: "Bad request", 403: "Refused", 404: "Not found", 409: "Already done", 422: "Cannot read the answer"}


def read_name_cookie(value: str | None) -> str | None:
    """The name in the cookie (percent-encoded UTF-8); None when absent or not decodable."""
    if value is None:
        return None
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        return None


def create_app(db: str | Path | AnnotationStore, *, title: str = "preftune annotate",
               allow_origins: Iterable[str] = (), hosts: Iterable[str] | None = None) -> FastAPI:
    """Build the app around one annotation database (settings such as --per-pair live in the db).

    ``allow_origins``: origins besides the server's own address (``Host``) whose pages may POST, e.g. a
    proxy's ``https://label.example.org``. ``hosts``: when given, the only Host names served (the CLI
    passes the loopback names when it listens on 127.0.0.1). Request bodies over 64 KiB get 413.
    """
    store = db if isinstance(db, AnnotationStore) else AnnotationStore(db)
    guard = Guard(store.secret(), allow_origins)
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.add_middleware(Gate, hosts=None if hosts is None else tuple(hosts))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")

    def page(request: Request, name: str, status: int = 200, **context: object) -> HTMLResponse:
        """A page whose forms carry this browser's session token (a new session when it has none)."""
        session = guard.session_of(request.cookies)
        fresh = session is None
        if fresh:
            session = guard.new_session()
        resp = templates.TemplateResponse(request, name, {"title": title, "csrf_token": guard.token(session),
                                                          **context}, status_code=status)
        if fresh:
            resp.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict")
        return resp

    def error(request: Request, exc: PreftuneError, annotator: str | None = None) -> HTMLResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)
        return page(request, "error.html", status=status, heading=TITLES.get(status, "Error"),
                    message=str(exc), annotator=annotator)

    def remember(resp: Response, annotator: str) -> Response:
        resp.set_cookie(COOKIE, quote(annotator, safe=""), httponly=True, samesite="lax")
        return resp

    def go_label(annotator: str, pair_id: str | None = None) -> RedirectResponse:
        url = f"/label?annotator={quote(annotator)}" + (f"&pair={quote(pair_id)}" if pair_id else "")
        return remember(RedirectResponse(url, status_code=303), annotator)

    def who(request: Request, given: str | None) -> str:
        """The annotator: a form field or query parameter first, else the cookie."""
        return check_name(given if given is not None else read_name_cookie(request.cookies.get(COOKIE)))

    def refuse(request: Request, token: str | None) -> None:
        """Raise CrossSiteError for a POST that is not from this server's own page (checked first)."""
        guard.check(request.headers, request.cookies, token)

    @app.get("/", response_class=HTMLResponse)
    def start(request: Request) -> Response:
        current = read_name_cookie(request.cookies.get(COOKIE)) or ""
        return page(request, "start.html", current=current, n_pairs=store.count_pairs())

    @app.post("/start")
    def start_post(request: Request, name: str | None = Form(None), group: str | None = Form(None),
                   csrf_token: str | None = Form(None)) -> Response:
        try:
            refuse(request, csrf_token)
        except CrossSiteError as exc:
            return error(request, exc)
        try:
            name = store.register_annotator(name or "", group)
        except PreftuneError as exc:
            return page(request, "start.html", status=422, current=name or "", group=group or "",
                        problem=exc.message, n_pairs=store.count_pairs())
        return go_label(name)

    @app.get("/label", response_class=HTMLResponse)
    def label(request: Request, annotator: str | None = None, pair: str | None = None) -> Response:
        if annotator is None and COOKIE not in request.cookies:
            return RedirectResponse("/", status_code=303)
        try:
            name = who(request, annotator)
            if pair is not None and store.is_open(pair, name):
                assignment = store.assignment(pair, name)
            else:
                assignment = store.next_pair(name)
        except PreftuneError as exc:
            return error(request, exc)
        progress = store.progress(name)
        if assignment is None:
            resp = page(request, "done.html", annotator=name, progress=progress)
        else:
            resp = page(request, "label.html", annotator=name, a=assignment, progress=progress)
        return resp if annotator is None else remember(resp, name)

    @app.post("/label")
    def label_post(request: Request, annotator: str | None = Form(None), pair_id: str | None = Form(None),
                   order: str | None = Form(None), choice: str | None = Form(None),
                   csrf_token: str | None = Form(None)) -> Response:
        missing = [k for k, v in (("pair_id", pair_id), ("order", order), ("choice", choice)) if v is None]
        try:
            refuse(request, csrf_token)
            if missing:
                raise InvalidLabelError(f"missing form field(s): {', '.join(missing)}", field=missing[0])
            name = who(request, annotator)
            answer = go_label(name)          # built before the label is stored: nothing after it can fail
            store.record(pair_id=pair_id, annotator=name, side=choice, order=order)
        except PreftuneError as exc:
            return error(request, exc, annotator)
        return answer

    @app.post("/undo")
    def undo(request: Request, annotator: str | None = Form(None), csrf_token: str | None = Form(None)) -> Response:
        try:
            refuse(request, csrf_token)
            name = who(request, annotator)
            pair_id = store.undo(name)
        except PreftuneError as exc:
            return error(request, exc, annotator)
        return go_label(name, pair_id)

    @app.get("/done", response_class=HTMLResponse)
    def done(request: Request, annotator: str | None = None) -> Response:
        try:
            name = who(request, annotator)
        except PreftuneError:
            return RedirectResponse("/", status_code=303)
        return page(request, "done.html", annotator=name, progress=store.progress(name))

    @app.get("/logout")
    def logout() -> Response:
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return f"ok {store.count_pairs()} pairs"

    return app
