"""The HTTP side of ``sdtrain ui``: a Starlette app of JSON endpoints, one server-sent event stream and
the static page. Every handler calls the toolkit (trainer.ui.dataset, recipe_form, runs) and turns its
UserError into the same paragraph the CLI prints.

Security (docs/ui.md): it binds 127.0.0.1 unless told otherwise, and then answers only requests whose
Host is a loopback name (no DNS rebinding). Bound to any other address it needs the token printed at
start on every request (query ``token=``, which the page turns into a cookie, or a Bearer header).
Changes are POSTs with a JSON body and no foreign Origin, which a page on another site cannot send.
Every path the browser names is confined to the root (trainer.ui.confine).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import json
import secrets
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from trainer.errors import UserError
from trainer.ui import dataset, recipe_form
from trainer.ui.confine import OutsideRoot, inside, relative
from trainer.ui.runs import Runs

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "sdtrain_token"
THUMBNAIL_SIDE = 192
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_EVENT_INTERVAL_S = 1.0


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _handled(handler):
    """Run a blocking handler in the thread pool; a UserError or a refused path becomes a JSON error."""

    async def endpoint(request: Request) -> Response:
        body = await request.json() if request.method == "POST" else {}
        try:
            result = await asyncio.to_thread(handler, request, body)
        except OutsideRoot as err:
            return _error(403, f"Refused: {err}. The UI reaches only files inside its folder.")
        except UserError as err:
            return _error(400, str(err))
        except (KeyError, ValueError) as err:
            return _error(400, f"The request lacks or garbles a field ({err}); reload the page.")
        return result if isinstance(result, Response) else JSONResponse(result)

    return endpoint


class Guard:
    """ASGI middleware: the token rule, the Host rule and the POST rule of the module docstring."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal, set_cookie = self._refusal(request)
        if refusal:
            return await _error(refusal[0], refusal[1])(scope, receive, send)
        if not set_cookie:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _refusal(self, request: Request) -> tuple[tuple[int, str] | None, bool]:
        host = request.headers.get("host", "")
        if self.token:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return (401, "This sdtrain UI needs its access token: open the address `sdtrain ui` printed when it started (it ends in ?token=...)."), False
        elif not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return (403, f"Host '{host}' refused: this UI listens on 127.0.0.1 only; open it as http://127.0.0.1:<port>/."), False
        if request.method not in ("GET", "HEAD"):
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return (415, "Changes are sent as JSON by the UI's own page."), False
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != host:
                return (403, f"Refused a change sent from another site ({origin})."), False
        return None, bool(self.token and request.query_params.get("token"))


def create_app(root: Path, token: str | None = None, python: str | None = None) -> Guard:
    """The app over ``root``; ``token`` set means every request must carry it."""
    root = Path(root).resolve()
    runs = Runs(root, **({"python": python} if python else {}))

    def file(request, _):
        path = inside(root, request.query_params.get("path", ""))
        if not path.is_file():
            raise UserError(f"'{request.query_params.get('path')}' is not a file.")
        return FileResponse(path)

    def thumbnail(request, _):
        path = inside(root, request.query_params.get("path", ""))
        with Image.open(path) as image:
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.convert("RGBA").save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    def folders(request, _):
        """Folders under the root (three levels), to pick a dataset from."""
        found = []
        for path in sorted(root.glob("*/")) + sorted(root.glob("*/*/")) + sorted(root.glob("*/*/*/")):
            rel = relative(root, path)
            if path.is_dir() and not any(part.startswith(".") for part in Path(rel).parts):
                found.append(rel)
        return {"root": str(root), "folders": sorted(found)}

    def open_dataset(request, _):
        resolution = request.query_params.get("resolution")
        return dataset.open_dataset(root, request.query_params.get("folder", ""), int(resolution) if resolution else None)

    def caption(request, body):
        return {"caption": dataset.write_caption(root, body["folder"], body["image"], body["caption"], body.get("expected"))}

    def tags(request, body):
        return dataset.bulk_edit(root, body["folder"], body["operation"], body.get("tag", ""), body.get("new_tag", ""), bool(body.get("first")))

    def recipes(request, _):
        return {"recipes": recipe_form.recipe_choices(root)}

    def recipe(request, _):
        return recipe_form.form(root, request.query_params.get("id", ""))

    def check(request, body):
        return recipe_form.check(root, body["recipe"], body["values"])

    def save(request, body):
        return {"saved": recipe_form.save(root, body["recipe"], body["values"], body["name"])}

    def run_list(request, _):
        return runs.list()

    def run_detail(request, _):
        return runs.detail(request.query_params.get("run", ""))

    def start(request, body):
        overrides = [line.strip() for line in body.get("overrides", "").splitlines() if line.strip()]
        return runs.enqueue(body["recipe"], overrides, overwrite=bool(body.get("overwrite")))

    def stop(request, body):
        runs.stop(body["run"])
        return {"stopping": body["run"]}

    def resume(request, body):
        steps = body.get("max_steps")
        return runs.resume(body["run"], int(steps) if steps else None)

    def cancel(request, body):
        runs.cancel(body["id"])
        return runs.list()

    async def events(request: Request) -> Response:
        """Server-sent events: the run list (and the chosen run's detail) whenever it changes."""
        run = request.query_params.get("run")
        if run:
            try:
                inside(root, run)
            except OutsideRoot as err:
                return _error(403, f"Refused: {err}.")

        async def stream():
            last = None
            while not await request.is_disconnected():
                state = {"list": await asyncio.to_thread(runs.list)}
                if run:
                    try:
                        state["detail"] = await asyncio.to_thread(runs.detail, run)
                    except UserError as err:
                        state["error"] = str(err)
                text = json.dumps(state)
                if text != last:
                    yield f"data: {text}\n\n"
                    last = text
                await asyncio.sleep(_EVENT_INTERVAL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    @asynccontextmanager
    async def lifespan(app):
        """The queue moves on while the UI runs, also when no browser is open."""
        stopped = threading.Event()

        def advance():
            while not stopped.wait(_EVENT_INTERVAL_S):
                runs.advance()

        threading.Thread(target=advance, daemon=True).start()
        yield
        stopped.set()

    routes = [
        Route("/", index),
        Route("/api/file", _handled(file)),
        Route("/api/thumbnail", _handled(thumbnail)),
        Route("/api/folders", _handled(folders)),
        Route("/api/dataset", _handled(open_dataset)),
        Route("/api/dataset/caption", _handled(caption), methods=["POST"]),
        Route("/api/dataset/tags", _handled(tags), methods=["POST"]),
        Route("/api/recipes", _handled(recipes)),
        Route("/api/recipe", _handled(recipe)),
        Route("/api/recipe/check", _handled(check), methods=["POST"]),
        Route("/api/recipe/save", _handled(save), methods=["POST"]),
        Route("/api/runs", _handled(run_list)),
        Route("/api/run", _handled(run_detail)),
        Route("/api/runs/start", _handled(start), methods=["POST"]),
        Route("/api/runs/stop", _handled(stop), methods=["POST"]),
        Route("/api/runs/resume", _handled(resume), methods=["POST"]),
        Route("/api/queue/cancel", _handled(cancel), methods=["POST"]),
        Route("/api/events", events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.runs = runs
    return Guard(app, token)


def serve(root: Path, host: str = "127.0.0.1", port: int = 7860) -> None:
    """``sdtrain ui``: serve until interrupted. Training runs started from it go on after it stops."""
    import uvicorn

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root '{root}' is not a folder. Pass the folder that holds your datasets, recipes and output.")
    token = None if is_loopback(host) else secrets.token_urlsafe(24)
    shown = f"[{host}]" if ":" in host else host
    print(f"sdtrain ui: {root.resolve()}")
    print(f"Open http://{shown}:{port}/" + (f"?token={token}" if token else ""), flush=True)
    if token:
        print("Listening beyond this machine: every request needs that token. Keep the address private.", flush=True)
    uvicorn.run(create_app(root, token), host=host, port=port, log_level="warning")
