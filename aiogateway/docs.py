"""Serving the API docs: ``/openapi.json``, Swagger UI at ``/docs`` and its assets.

The document is generated once per config load (:mod:`aiogateway.openapi`)
and served as ready bytes with an ETag: no work per request. Upstream
documents (``openapi = "/openapi.json"`` on an upstream table) are fetched in
the background at startup and on every reload, then every
``docs.refresh_interval`` seconds, failures retried with backoff; the last good
copy is kept (served stale while its service is down) and the gateway's
document is rebuilt whenever one changes. Nothing ever waits on them.

Swagger UI's files come from an installed package, the optional ``docs``
extra (``pip install 'aiogateway[docs]'``: ``flask-swagger-ui`` ships the
swagger-ui-dist 5.x build; only its files are read, Flask is never imported),
so /docs works offline. Without it /openapi.json is served all the same and
the Swagger UI paths answer a 503 JSON error naming the extra; every load
(startup, reload) looks again. The docs paths are gateway endpoints:
``docs.chain`` guards them like a route's chain; ``docs.enabled = false``
removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import html
import importlib.util
import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .build import RESERVED_PATHS
from .chain import EMPTY_CHAIN, Chain
from .errors import SERVICE_UNAVAILABLE, ConfigError
from .openapi import build_document
from .openapi_merge import normalize_document
from .plugin import Endpoint

if TYPE_CHECKING:
    from .routes import RouteTable
    from .server import Gateway
    from .settings import DocsSettings

__all__ = ["DocsService", "fetch_document", "fetch_documents", "swagger_ui_assets"]

log = logging.getLogger("aiogateway.docs")

JsonDict = dict[str, Any]

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
ASSET_PACKAGE = "flask_swagger_ui"  # its dist/ is swagger-ui-dist, verbatim
DOCS_EXTRA = "docs"  # setup.cfg's extra that installs ASSET_PACKAGE
MISSING_ASSETS = (
    f"Swagger UI is not installed: install the {DOCS_EXTRA!r} extra "
    f"(pip install 'aiogateway[{DOCS_EXTRA}]'); the OpenAPI document is served all the same"
)
JAVASCRIPT = "application/javascript"
ASSETS = {
    "swagger-ui-bundle.js": JAVASCRIPT,
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0


@functools.cache
def swagger_ui_assets() -> dict[str, tuple[bytes, str]]:
    """Swagger UI's files by name: (bytes, content type). Read once per process."""
    spec = importlib.util.find_spec(ASSET_PACKAGE)  # finds without importing (or Flask)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no package {ASSET_PACKAGE!r}")
    dist = Path(next(iter(spec.submodule_search_locations))) / "dist"
    return {name: ((dist / name).read_bytes(), ctype) for name, ctype in ASSETS.items()}


def document_url(base: str, openapi: str) -> str:
    if openapi.startswith(("http://", "https://")):
        return openapi
    return base.rstrip("/") + "/" + openapi.lstrip("/")


async def fetch_document(session: aiohttp.ClientSession, url: str, seconds: float) -> JsonDict:
    """GET an OpenAPI document (JSON) and normalize it; raises on any problem."""
    async with session.get(
        url, timeout=aiohttp.ClientTimeout(total=seconds), headers={"Accept": "application/json"}
    ) as resp:
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"document over {MAX_DOCUMENT_BYTES} bytes")
    try:
        return normalize_document(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None


async def fetch_documents(table: RouteTable, seconds: float) -> dict[str, JsonDict]:
    """Every upstream's document, fetched once (``aiogateway openapi --fetch``)."""
    out: dict[str, JsonDict] = {}
    async with aiohttp.ClientSession() as session:
        for name, upstream in table.settings.upstreams.items():
            if upstream.openapi is None:
                continue
            url = document_url(upstream.url, upstream.openapi)
            try:
                out[name] = await fetch_document(session, url, seconds)
            except Exception as exc:
                log.warning("upstream %s: no OpenAPI document from %s: %s", name, url, exc)
    return out


class _Published:
    """One table's served document (bytes + ETag), rebuilt when upstream documents change."""

    def __init__(self, table: RouteTable, docs: DocsSettings) -> None:
        self.table = table
        self.docs = docs
        self.body = b""
        self.etag = ""
        self.version = -1  # of the upstream documents cache it was built from

    def rebuild(self, upstream_docs: Mapping[str, JsonDict], version: int) -> None:
        self.version = version
        try:
            document = build_document(self.table, self.docs, upstream_docs)
        except Exception:  # an upstream document we failed to merge: never lose the rest
            log.exception("merging upstream OpenAPI documents failed; serving the generated part")
            document = build_document(self.table, self.docs)
        self.body = orjson.dumps(document)
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'

    async def serve_document(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = {"ETag": self.etag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, content_type="application/json", headers=headers)


class DocsService:
    """The docs of a gateway across reloads; upstream documents cached by URL."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.cache: dict[str, JsonDict] = {}  # document URL -> last good document
        self.version = 0  # bumped on every change of the cache
        self._failing: dict[str, str] = {}  # URL -> last error (logged once per change)
        self._published: weakref.WeakKeyDictionary[RouteTable, _Published] = (
            weakref.WeakKeyDictionary()
        )
        self._current: _Published | None = None
        self._stop = asyncio.Event()  # set: the current fetch loops end

    def upstream_docs(self, table: RouteTable) -> dict[str, JsonDict]:
        out: dict[str, JsonDict] = {}
        for name, upstream in table.settings.upstreams.items():
            if upstream.openapi is not None:
                doc = self.cache.get(document_url(upstream.url, upstream.openapi))
                if doc is not None:
                    out[name] = doc
        return out

    def prepare(self, table: RouteTable) -> None:
        """Register the docs endpoints of ``table`` (before it goes live); ConfigError if bad."""
        docs = table.settings.docs
        if not docs.enabled:
            return
        file = str(self.gateway.config_path)
        chain = _guard_chain(table, docs.chain)
        published = _Published(table, docs)
        published.rebuild(self.upstream_docs(table), self.version)
        endpoints = {docs.openapi_path: published.serve_document}
        ui = {
            docs.path: _page(docs),
            f"{docs.path}/swagger-ui-init.js": _static(_init_script(docs), JAVASCRIPT, "no-cache"),
        }
        try:
            assets = swagger_ui_assets()
        except OSError as exc:  # the same paths, answering what to install
            log.warning("%s (%s)", MISSING_ASSETS, exc)
            ui = dict.fromkeys([*ui, *(f"{docs.path}/{name}" for name in ASSETS)], _unavailable)
        else:
            for name, (body, ctype) in assets.items():
                ui[f"{docs.path}/{name}"] = _static(body, ctype)
        endpoints.update(ui)
        _check_paths(table, endpoints, file)
        for path, handler in endpoints.items():
            table.endpoints[path] = (Endpoint(path, handler), chain)
        self._published[table] = published

    def activate(self, table: RouteTable) -> None:
        """``table`` is live: (re)start fetching its upstreams' documents in the background."""
        self._stop.set()
        self._stop = asyncio.Event()
        self._current = current = self._published.get(table)
        if current is None:
            return
        if current.version != self.version:  # a fetch landed since prepare()
            current.rebuild(self.upstream_docs(table), self.version)
        seen: set[str] = set()
        for name, upstream in table.settings.upstreams.items():
            if upstream.openapi is None:
                continue
            url = document_url(upstream.url, upstream.openapi)
            if url not in seen:
                seen.add(url)
                self.gateway.spawn(self._fetch_loop(name, url, table.settings.docs, self._stop))

    async def _fetch_loop(
        self, name: str, url: str, docs: DocsSettings, stop: asyncio.Event
    ) -> None:
        retry = _RETRY_FIRST
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                ok = await self._fetch_once(session, name, url, docs)
                wait = docs.refresh_interval if ok else retry
                retry = _RETRY_FIRST if ok else min(retry * 2, _RETRY_MAX)
                if ok and not wait:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)

    async def _fetch_once(
        self, session: aiohttp.ClientSession, name: str, url: str, docs: DocsSettings
    ) -> bool:
        try:
            doc = await fetch_document(session, url, docs.fetch_timeout)
            current = self._current
            if current is not None:  # reject what would not merge, keep the last good one
                build_document(current.table, docs, {name: doc})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self._failing.get(url) != reason:
                stale = " (serving the last good copy)" if url in self.cache else ""
                log.warning("upstream %s: OpenAPI document %s: %s%s", name, url, reason, stale)
            self._failing[url] = reason
            return False
        if self._failing.pop(url, None) is not None or url not in self.cache:
            log.info("upstream %s: OpenAPI document fetched from %s", name, url)
        if self.cache.get(url) != doc:
            self.cache[url] = doc
            self.version += 1
            current = self._current
            if current is not None:
                current.rebuild(self.upstream_docs(current.table), self.version)
        return True


def _guard_chain(table: RouteTable, spec: str | list[str] | None) -> Chain:
    """The chain guarding the docs (references checked at load by GatewaySettings)."""
    if spec is None:
        return EMPTY_CHAIN
    if isinstance(spec, str):
        return table.chains[spec]
    return Chain("docs", tuple(table.plugins[name] for name in spec)) if spec else EMPTY_CHAIN


def _check_paths(table: RouteTable, endpoints: Mapping[str, object], file: str) -> None:
    """Clashes only the built table shows (routes are checked at load)."""
    for path in endpoints:
        problem = None
        if path in RESERVED_PATHS:
            problem = f"{path} is answered by the gateway itself"
        elif path in table.endpoints:
            problem = f"{path} is already served by a plugin endpoint"
        if problem is not None:
            where = "docs.openapi_path" if path == table.settings.docs.openapi_path else "docs.path"
            raise ConfigError(problem, file=file, location=where)


def _static(body: bytes, content_type: str, cache: str = "public, max-age=86400") -> Any:
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": cache, "X-Content-Type-Options": "nosniff"}

    async def serve(request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        response = web.Response(body=body, headers=headers)
        response.content_type = content_type
        if content_type.startswith(("text/", JAVASCRIPT)):
            response.charset = "utf-8"
        return response

    return serve


class _ServiceUnavailable(web.Response):
    """The gateway's 503 JSON error, saying which extra to install.

    An endpoint handler sees only the request; the gateway stamps the response
    with the exchange's X-Request-ID after the handler returns, so the body's
    ``request_id`` is written from that header when the response is sent.
    """

    def __init__(self) -> None:
        super().__init__(
            status=503, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        body = {
            "error": SERVICE_UNAVAILABLE,
            "message": MISSING_ASSETS,
            "request_id": self.headers.get("X-Request-ID", ""),
        }
        self.body = orjson.dumps(body)
        return await super().prepare(request)


async def _unavailable(request: web.BaseRequest) -> web.StreamResponse:
    return _ServiceUnavailable()


def _init_script(docs: DocsSettings) -> bytes:
    config = {
        "url": docs.openapi_path,
        "dom_id": "#swagger-ui",
        "deepLinking": True,
        "displayRequestDuration": True,
        "layout": "BaseLayout",
    }
    return (
        b"window.ui = SwaggerUIBundle(Object.assign("
        + orjson.dumps(config)
        + b", {presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]}"
        + b"));\n"
    )


def _page(docs: DocsSettings) -> Any:
    base = html.escape(docs.path)
    text = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(docs.title)} - API docs</title>
<link rel="stylesheet" type="text/css" href="{base}/swagger-ui.css">
<link rel="icon" type="image/png" href="{base}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{base}/swagger-ui-bundle.js"></script>
<script src="{base}/swagger-ui-init.js"></script>
</body>
</html>
"""
    return _static(text.encode(), "text/html", "no-cache")
