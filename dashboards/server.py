"""The dashboard's aiohttp web server: the static page, its JSON endpoints and the anomaly-map overlays.

Endpoints:

- ``GET /``: the page (``static/index.html``), which loads ``/static/app.js`` and ``/static/style.css``;
- ``GET /api/summary``: :func:`qcstream.dashboards.data.summary` over the configured window;
- ``GET /api/lag``: the worker group's consumer lag (:class:`~qcstream.dashboards.lag.LagReader`);
- ``GET /api/overlay/{frame_id}``: the overlay PNG of a frame, read from MinIO.

The browser never gets an object key or a MinIO credential: the overlay endpoint
takes a frame id, looks its key up in the ``results`` view and reads the object
with the server's own credentials.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from qcstream.dashboards import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WINDOW_SECONDS, data
from qcstream.dashboards.lag import LagReader
from qcstream.settings import Settings
from qcstream.storage.objects import (
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreAccessError,
    ObjectStoreUnavailableError,
)
from qcstream.streams.records import RecordError

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The page is served only with files from its own origin: no CDN, no inline script.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'"

SETTINGS_KEY = web.AppKey("settings", Settings)
WINDOW_KEY = web.AppKey("window_seconds", float)
LAG_KEY = web.AppKey("lag_reader", LagReader)
STORE_KEY = web.AppKey("object_store", ObjectStore)


def create_app(settings: Settings, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> web.Application:
    """Build the web application for ``settings``, with charts over the last ``window_seconds``."""
    data.bucket_seconds(window_seconds)  # raises ValueError for an invalid window before anything starts
    app = web.Application(middlewares=[_security_headers])
    app[SETTINGS_KEY] = settings
    app[WINDOW_KEY] = float(window_seconds)
    app[LAG_KEY] = LagReader(settings)
    app[STORE_KEY] = ObjectStore(settings, attempts=2)
    app.router.add_get("/", _index)
    app.router.add_get("/favicon.ico", _no_icon)
    app.router.add_get("/static/{name}", _static_file)
    app.router.add_get("/api/summary", _summary)
    app.router.add_get("/api/lag", _lag)
    app.router.add_get("/api/overlay/{frame_id}", _overlay)
    app.on_cleanup.append(_close_clients)
    return app


def serve(
    settings: Settings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
) -> int:
    """Serve the dashboard until SIGINT or SIGTERM, print its URL once it listens, and return the exit code 0.

    Port 0 picks a free port, and the printed URL names it. Raises
    :class:`OSError` with the port and what to do when the address is taken.
    """
    app = create_app(settings, window_seconds)
    return asyncio.run(_serve(app, host, port))


async def _serve(app: web.Application, host: str, port: int) -> int:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise OSError(
                    error.errno, f"port {port} on {host} is already in use: stop what uses it or choose another with --port"
                ) from error
            raise
        bound_host, bound_port = runner.addresses[0][:2]
        url = f"http://{_url_host(bound_host)}:{bound_port}/"
        settings = app[SETTINGS_KEY]
        logger.info(
            "dashboard serving %s: data %s, window %.0f s, consumer group %s",
            url, settings.data_dir, app[WINDOW_KEY], settings.app_id,
        )
        print(f"qcstream dashboard: {url}", flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        await stop.wait()
        logger.info("dashboard stopping")
    finally:
        await runner.cleanup()
    logger.info("dashboard stopped")
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@web.middleware
async def _security_headers(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def _close_clients(app: web.Application) -> None:
    await asyncio.get_running_loop().run_in_executor(None, app[LAG_KEY].close)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _no_icon(request: web.Request) -> web.Response:
    # Browsers request it by themselves, and a 204 response keeps their console free of 404 errors.
    return web.Response(status=204)


#: The only files under ``/static/``, with their content types.
_STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


async def _static_file(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in _STATIC_FILES:
        raise web.HTTPNotFound(text=f"no static file {name!r}")
    return web.FileResponse(
        STATIC_DIR / name, headers={"Content-Type": _STATIC_FILES[name], "Cache-Control": "no-cache"}
    )


async def _summary(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    window = request.app[WINDOW_KEY]
    loop = asyncio.get_running_loop()
    try:
        body = await loop.run_in_executor(None, partial(data.summary, settings.data_dir, window))
    except Exception as error:  # noqa: BLE001 - the page shows the message; the log has the traceback
        logger.exception("summary query over %s failed", settings.data_dir)
        return _json({"error": f"the query over {settings.data_dir} failed: {error}"}, status=500)
    return _json(body)


async def _lag(request: web.Request) -> web.Response:
    reader = request.app[LAG_KEY]
    body = await asyncio.get_running_loop().run_in_executor(None, reader.read)
    body["frames_topic"] = request.app[SETTINGS_KEY].topic_frames
    return _json(body)


async def _overlay(request: web.Request) -> web.Response:
    frame_id = request.match_info["frame_id"]
    settings = request.app[SETTINGS_KEY]
    store = request.app[STORE_KEY]
    loop = asyncio.get_running_loop()
    try:
        location = await loop.run_in_executor(None, partial(data.overlay_location, settings.data_dir, frame_id))
    except RecordError as error:
        raise web.HTTPBadRequest(text=str(error)) from error
    if location is None:
        raise web.HTTPNotFound(text=f"no result for frame {frame_id!r} in {settings.data_dir}")

    bucket, key = location
    try:
        png = await loop.run_in_executor(None, partial(store.get_bytes, bucket, key))
    except ObjectNotFoundError as error:
        logger.warning("overlay of frame %s is missing: %s", frame_id, error)
        raise web.HTTPNotFound(text=f"the overlay of frame {frame_id!r} is not in MinIO") from error
    except (ObjectStoreUnavailableError, ObjectStoreAccessError, ValueError) as error:
        logger.error("reading the overlay of frame %s failed: %s", frame_id, error)
        raise web.HTTPBadGateway(text=f"reading the overlay of frame {frame_id!r} from MinIO failed") from error
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    text = json.dumps(body, default=str, allow_nan=False)
    return web.Response(text=text, status=status, content_type="application/json", headers={"Cache-Control": "no-store"})
