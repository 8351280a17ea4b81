"""The ASGI app behind ``kql serve``: one page and a small JSON API.

========  ==================================  ==========================================
method    path                                does
========  ==================================  ==========================================
GET       /                                   the page
GET       /static/<file>                      its script and style sheet
GET       /api/options                        models, samples, patch/stride/mode choices, limits
GET       /api/approximate?model=&patch=      is approximate mode offered, with which SSIM targets
POST      /api/images                         upload an image (the body is the file) -> its id
GET       /api/images/<id>                    an image (sample or upload) as PNG
POST      /api/explain                        EXPLAIN of a request: text, speedup, estimated time
POST      /api/jobs                           queue a request -> job id and place in line
GET       /api/jobs/<id>                      state, place in line, progress, result
POST      /api/jobs/<id>/cancel               cancel a waiting or running job
GET       /api/jobs/<id>/overlay.png          the heatmap as a transparent overlay (model input size)
GET       /api/jobs/<id>/figure.png           the figure INTO '<file>.png' would write
========  ==================================  ==========================================

Every error is ``{"error": "<one line>"}`` with a 4xx status (5xx for a bug,
whose traceback goes to the server log only).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

from kql.errors import KqlError
from kql.planner.plan import format_bytes
from kql.web.errors import WebError
from kql.web.uploads import MAX_BYTES, MAX_PIXELS, ImageStore, decode

log = logging.getLogger("kql.web")

STATIC = Path(__file__).resolve().parent / "static"
MAX_JSON_BYTES = 64 * 1024

# The page loads nothing from elsewhere and runs no inline script.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(engine=None, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               max_queued: int = 16):
    """The Starlette app. ``engine`` defaults to a fresh :class:`Engine` (one
    KQL connection); limits cap uploads and the queue."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.concurrency import run_in_threadpool
    from starlette.staticfiles import StaticFiles

    from kql.web.engine import Engine
    from kql.web.jobs import JobQueue

    if engine is None:
        engine = Engine(uploads=ImageStore())
    queue = JobQueue(engine.run, max_queued=max_queued)

    async def read_body(request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise WebError(f"the request is {format_bytes(int(declared))}; the limit is "
                           f"{format_bytes(limit)}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise WebError(f"the request is larger than the limit of {format_bytes(limit)}", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request):
        body = await read_body(request, MAX_JSON_BYTES)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise WebError("the request body must be JSON") from None

    def job_json(job) -> dict:
        out = {"id": job.id, "state": job.state, "phase": job.phase, "position": queue.position(job),
               "progress": {"done": job.done, "total": job.total}, "error": job.error}
        if job.result is not None:
            out["result"] = job.result
            out["files"] = {name: f"/api/jobs/{job.id}/{name}" for name in job.files}
        return out

    # -- routes -------------------------------------------------------------------
    async def page(request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def options(request):
        return JSONResponse(engine.options())

    async def approximate(request):
        patch = request.query_params.get("patch", "")
        return JSONResponse(engine.approximate(request.query_params.get("model"),
                                               int(patch) if patch.isdigit() else patch))

    async def upload(request):
        data = await read_body(request, max_bytes)
        pixels = await run_in_threadpool(decode, data, max_bytes=max_bytes, max_pixels=max_pixels)
        # the page sends the file name URL-encoded (headers are Latin-1); it is only shown back
        item = engine.uploads.add(unquote(request.headers.get("x-filename", "")), pixels)
        h, w = pixels.shape[:2]
        return JSONResponse({"id": item.id, "name": item.name, "width": w, "height": h}, status_code=201)

    async def image(request):
        png = await run_in_threadpool(engine.image_png, request.path_params["image_id"])
        return Response(png, media_type="image/png")

    async def explain(request):
        req = engine.validate(await read_json(request))
        return JSONResponse(await run_in_threadpool(engine.explain, req))

    async def submit(request):
        req = engine.validate(await read_json(request))
        job = queue.submit(req)
        return JSONResponse(job_json(job), status_code=202)

    async def job_status(request):
        return JSONResponse(job_json(queue.get(request.path_params["job_id"])))

    async def cancel(request):
        return JSONResponse(job_json(queue.cancel(request.path_params["job_id"])))

    async def job_file(request):
        job = queue.get(request.path_params["job_id"])
        data = job.files.get(request.path_params["name"])
        if data is None:
            raise WebError("no such file for this job (it has not finished, or failed)", 404)
        return Response(data, media_type="image/png")

    # -- errors: one line of JSON, never a traceback ------------------------------------
    async def web_error(request, exc: WebError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def kql_error(request, exc: KqlError):
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return JSONResponse({"error": lines[0] if lines else type(exc).__name__}, status_code=400)

    async def http_error(request, exc: HTTPException):
        messages = {404: "not found", 405: "method not allowed"}
        return JSONResponse({"error": messages.get(exc.status_code, exc.detail)}, status_code=exc.status_code)

    async def internal_error(request, exc: Exception):
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error (the server log has details)"}, status_code=500)

    class SecurityHeaders:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def send_with_headers(message):
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers", []))
                    present = {k.lower() for k, _ in headers}
                    headers += [(k.lower().encode(), v.encode()) for k, v in _HEADERS.items()
                                if k.lower().encode() not in present]
                    message = {**message, "headers": headers}
                await send(message)
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            await self.app(scope, receive, send_with_headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        queue.close()

    routes = [
        Route("/", page),
        Route("/api/options", options),
        Route("/api/approximate", approximate),
        Route("/api/images", upload, methods=["POST"]),
        Route("/api/images/{image_id}", image),
        Route("/api/explain", explain, methods=["POST"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_status),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id}/{name}", job_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)], lifespan=lifespan,
                    exception_handlers={WebError: web_error, KqlError: kql_error,
                                        HTTPException: http_error, Exception: internal_error})
    app.state.engine = engine
    app.state.queue = queue
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          sockets: Optional[list] = None) -> None:
    """Run the app with uvicorn until Ctrl-C."""
    import uvicorn
    app = create_app()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    server = uvicorn.Server(config)
    server.run(sockets=sockets)


def main(argv: Optional[list[str]] = None) -> int:
    """``kql serve [--host 127.0.0.1] [--port 8000]``."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="kql serve",
                                     description="Serve the KQL page: explain a CNN's prediction in a browser.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; the page has no login)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    args = parser.parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        sys.stderr.write("kql serve needs the web extra: pip install 'kql[web]'\n")
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"warning: serving on {args.host}: anyone who can reach it can run queries "
                         f"(there is no login)\n")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"KQL page on http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/ "
          f"(Ctrl-C stops)", flush=True)
    serve(args.host, args.port)
    return 0
