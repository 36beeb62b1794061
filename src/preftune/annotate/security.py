"""Refuse cross-site and oversized requests to the annotation app.

Every state-changing request (a POST) must pass two checks, either of which alone stops a page on
another site from answering, undoing or registering on a person's behalf:

1. Same origin: the ``Origin`` header (or, when a browser sends none, the ``Referer``) must name the
   address the browser used for this server -- the ``Host`` header -- or one of the origins given with
   ``--allow-origin`` (a proxy that serves the app under another name). ``Origin: null`` is refused.
   A request with neither header (a script, curl) is not a browser's cross-site request; the token
   below still applies to it.
2. A session token: the first page a browser gets sets a random session id in an HttpOnly,
   SameSite=Strict cookie, and every form on the page carries ``csrf_token`` = HMAC-SHA256(secret,
   session id) (scripts may send it as the ``X-CSRF-Token`` header). The secret is random and kept in
   the database, so pages stay valid across server restarts. Compared with ``hmac.compare_digest``.

Either failure is a ``CrossSiteError`` (HTTP 403) and changes nothing.

``Gate`` is the ASGI middleware in front of the app: it answers 413 to a request body over
``MAX_BODY_BYTES`` (the forms are a few hundred bytes) and, when the server listens on a loopback
address only, 400 to a ``Host`` that is not a loopback name or an allowed origin (so a DNS-rebinding
page cannot reach the server under its own name).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from preftune.errors import PreftuneError

SESSION_COOKIE = "preftune_session"
TOKEN_FIELD = "csrf_token"
TOKEN_HEADER = "x-csrf-token"
MAX_BODY_BYTES = 64 * 1024
DRAIN_BYTES = 16 * 1024 * 1024      # a bigger body is refused without reading the rest
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{32,64}")
_DEFAULT_PORT = {"http": 80, "https": 443}


class CrossSiteError(PreftuneError):
    """A state-changing request from another site, or without this browser's session token (HTTP 403)."""


def normalise_origin(value: str) -> str:
    """``scheme://host[:port]`` in lower case, for ``--allow-origin`` values; anything else is an error."""
    parts = urlsplit(value.strip().rstrip("/"))
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in _DEFAULT_PORT or not parts.hostname or port == -1 or parts.path or parts.query \
            or parts.username:
        raise PreftuneError(f"{value!r} is not an origin", field="allow_origin",
                            hint="give scheme, host and optional port only, e.g. https://label.example.org")
    return f"{parts.scheme}://{_host_port(parts.hostname, port)}"


def _host_port(host: str, port: int | None) -> str:
    host = host.lower()
    if ":" in host:                                         # an IPv6 address goes in brackets
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def _endpoint(scheme: str, netloc: str) -> tuple[str, int] | None:
    """(host, port) of a netloc, the scheme's default port filled in; None when it cannot be read."""
    try:
        parts = urlsplit(f"//{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host.lower(), port if port is not None else _DEFAULT_PORT.get(scheme, 80)


class Guard:
    """Session ids, their tokens and the two checks above, for one app."""

    def __init__(self, secret: str, allow_origins: Iterable[str] = ()) -> None:
        self._key = secret.encode()
        self.allow_origins = frozenset(normalise_origin(o) for o in allow_origins)

    @staticmethod
    def session_of(cookies: dict[str, str]) -> str | None:
        """The session id in the request's cookie, if it has the shape of one we issued."""
        value = cookies.get(SESSION_COOKIE)
        return value if value is not None and _SESSION_RE.fullmatch(value) else None

    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(32)

    def token(self, session: str) -> str:
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def same_origin(self, source: str, host_header: str | None) -> bool:
        """Whether ``source`` (an Origin or Referer value) is this server as the browser addressed it."""
        try:
            parts = urlsplit(source.strip())
            if parts.scheme not in _DEFAULT_PORT or not parts.netloc:
                return False                                # "null", file:, garbage
            if f"{parts.scheme}://{_host_port(parts.hostname or '', parts.port)}" in self.allow_origins:
                return True
        except ValueError:                                  # "http://[::1", a port that is not a number
            return False
        mine = _endpoint(parts.scheme, host_header or "")
        return mine is not None and _endpoint(parts.scheme, parts.netloc.rpartition("@")[2]) == mine

    def check(self, headers, cookies: dict[str, str], form_token: str | None) -> None:
        """Raise CrossSiteError unless the request comes from this site with this session's token."""
        origin = headers.get("origin")
        source = origin if origin is not None else headers.get("referer")
        if source is not None and not self.same_origin(source, headers.get("host")):
            shown = source if len(source) <= 100 else source[:100] + "..."
            raise CrossSiteError(
                f"refused: this request came from another site ({'Origin' if origin is not None else 'Referer'} "
                f"{shown!r}, while this server is {headers.get('host')!r})",
                hint="label on the server's own pages; behind a proxy, start the server with "
                     "--allow-origin https://NAME")
        given = form_token if form_token is not None else headers.get(TOKEN_HEADER)
        session = self.session_of(cookies)
        if not given or session is None or not hmac.compare_digest(self.token(session).encode(),
                                                                   given.encode("utf-8", "replace")):
            raise CrossSiteError(
                "refused: the page's session token is missing or does not match this browser's session",
                hint="reload the page (or open the start page) and answer again")


def loopback_hosts(host: str, allow_origins: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The Host names to accept when serving on ``host``: loopback names (plus the allowed origins'
    hosts) when it is a loopback address, else None (any Host: the server's network names are unknown)."""
    extra = [urlsplit(normalise_origin(o)).hostname or "" for o in allow_origins]     # checks them all
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, host.lower(), *extra))) if loopback else None


class Gate:
    """ASGI middleware: 413 for a body over ``max_body`` bytes, 400 for a Host outside ``hosts``."""

    def __init__(self, app, *, max_body: int = MAX_BODY_BYTES, hosts: Iterable[str] | None = None) -> None:
        self.app, self.max_body = app, max_body
        self.hosts = None if hosts is None else frozenset(h.lower() for h in hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            end = _endpoint("http", host)
            if end is None or end[0].strip("[]") not in self.hosts:
                return await _answer(send, 400, f"refused: this server does not answer to the Host {host!r}; "
                                     "open it at http://127.0.0.1:PORT/ (or start it with --allow-origin "
                                     "for a proxy's name)\n")
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _answer(send, 400, "refused: the Content-Length header is not a number\n")
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and length in (None, b"0"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0               # read the whole (small) body first; past the limit, drain and refuse
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return                                        # the client went away
            size += len(message.get("body", b""))
            if size <= self.max_body:
                chunks.append(message.get("body", b""))
            if not message.get("more_body") or size > DRAIN_BYTES:
                break
        if size > self.max_body:
            return await _answer(send, 413, f"refused: the request body is over {self.max_body:,} bytes "
                                 "(an answer is a few hundred)\n")
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _answer(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
