"""The review page's routes: login, worklist and monitoring panel, intake, case view, verdicts, pictures.

Server-rendered HTML (jinja2, autoescaped: an upload's name is only ever text on the page) with one static
script and one style sheet served by the app: nothing from another origin, no inline script or handler (the
Content-Security-Policy forbids them). Every form carries the session's CSRF token; the session cookie is
HttpOnly and SameSite=Strict (and Secure over https).
"""
from __future__ import annotations

import asyncio
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.images import ImageReadError
from review import auth, intake, studies, viewer, worklist
from review.monitor import panel
from review.station import ReviewStation
from review.urls import HOME, PREFIX
from serving.app import read_form

HERE = Path(__file__).resolve().parent
SESSION_COOKIE, LOGIN_COOKIE = "review_session", "review_login"
STATIC = {"review.js": "text/javascript", "review.css": "text/css", "favicon.svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                    "Cache-Control": "no-store"}  # patient images and names: never kept by a browser cache
MAX_FLAGS = 2048  # flagged slices one verdict may carry
MAX_PAGE = 1_000_000  # worklist pages: beyond this an offset overflows the database's integer (a 500 before)
MAX_FRAME = 1_000_000  # frames asked of a slice: more than any file holds (images.max_frames)
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
TEMPLATES.globals["prefix"] = PREFIX  # templates link with it, never with the path written out


def _percent(value) -> str:
    return "" if value is None else f"{value:.1%}"


TEMPLATES.filters["pct"] = _percent


def page(template: str, status: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(template).render(**context), status, headers=SECURITY_HEADERS)


def png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers=SECURITY_HEADERS)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, 303, headers=SECURITY_HEADERS)


def local_next(value: str | None) -> str:
    """Where to go after the login: a path of this page only (no other host, no scheme)."""
    if value and value.startswith(PREFIX + "/") and "//" not in value and "\\" not in value:
        return value
    return HOME


class Pages:
    """The routes over one station; `router` is what the server includes."""

    def __init__(self, station: ReviewStation):
        self.station = station
        self.router = APIRouter(include_in_schema=False)
        self._static = {name: (HERE / "static" / name).read_bytes() for name in STATIC}
        self._throttle = auth.Throttle()
        self._hash_pool = ThreadPoolExecutor(2, thread_name_prefix="password-hash")
        self._add_routes()

    # ---- sessions ---------------------------------------------------------------------------------------
    def _secure(self, request: Request) -> bool:
        configured = self.station.settings.secure_cookie
        return request.url.scheme == "https" if configured is None else configured

    def _set_cookie(self, response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="strict",
                            secure=self._secure(request))

    async def reviewer(self, request: Request) -> auth.Reviewer | None:
        return await asyncio.to_thread(auth.reviewer_for, self.station.engine, request.cookies.get(SESSION_COOKIE))

    async def require(self, request: Request) -> auth.Reviewer:
        """The logged-in reviewer; a page asked for without a login goes to the login (and comes back)."""
        who = await self.reviewer(request)
        if who is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise HTTPException(303, headers={"Location": f"{PREFIX}/login?next={quote(target)}", **SECURITY_HEADERS})
        return who

    @staticmethod
    def check_csrf(who: auth.Reviewer, fields) -> None:
        if not auth.same_token(who.csrf, fields.get("csrf")):
            raise HTTPException(403, "the form's security token is missing or stale: reload the page and retry")

    # ---- routes -----------------------------------------------------------------------------------------
    def _add_routes(self) -> None:
        r = self.router
        r.add_api_route("/", lambda: redirect(HOME), methods=["GET"])
        r.add_api_route(PREFIX, lambda: redirect(HOME), methods=["GET"])
        r.add_api_route(PREFIX + "/static/{name}", self.static, methods=["GET"])
        r.add_api_route(PREFIX + "/login", self.login_form, methods=["GET"])
        r.add_api_route(PREFIX + "/login", self.login, methods=["POST"])
        r.add_api_route(PREFIX + "/logout", self.logout, methods=["POST"])
        r.add_api_route(PREFIX + "/", self.worklist, methods=["GET"])
        r.add_api_route(PREFIX + "/studies", self.studies, methods=["GET"])
        r.add_api_route(PREFIX + "/upload", self.upload, methods=["POST"])
        r.add_api_route(PREFIX + "/case/{case_id}", self.case, methods=["GET"])
        r.add_api_route(PREFIX + "/case/{case_id}/slice.png", self.slice, methods=["GET"])
        r.add_api_route(PREFIX + "/case/{case_id}/series.json", self.series, methods=["GET"])
        r.add_api_route(PREFIX + "/case/{case_id}/pixels", self.pixels, methods=["GET"])
        r.add_api_route(PREFIX + "/case/{case_id}/verdict", self.verdict, methods=["POST"])
        r.add_api_route(PREFIX + "/verdict/{verdict_id}/undo", self.undo, methods=["POST"])
        r.add_api_route(PREFIX + "/item/{prediction_id}/{direction}", self.step, methods=["GET"])
        r.add_api_route(PREFIX + "/heatmap/{prediction_id}.png", self.heatmap, methods=["GET"])
        r.add_api_route(PREFIX + "/heatmap/{prediction_id}.json", self.heatmap_facts, methods=["GET"])

    async def static(self, name: str):
        if name not in STATIC:
            raise HTTPException(404)
        return Response(self._static[name], media_type=STATIC[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def login_form(self, request: Request, next: str | None = None, failed: bool = False):
        token = secrets.token_urlsafe(32)
        response = page("login.html", 401 if failed else 200, csrf=token, next=local_next(next), failed=failed)
        self._set_cookie(response, request, LOGIN_COOKIE, token, None)
        return response

    async def login(self, request: Request):
        form = await request.form(max_files=0, max_fields=8)
        if not auth.same_token(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
            raise HTTPException(403, "the login form expired: reload the page and retry")
        name, client = str(form.get("name", "")), request.client.host if request.client else None
        keys, now = [f"address:{client}", f"name:{name}"], time.monotonic()
        wait = self._throttle.wait_s(keys, now)
        if wait > 0:  # refused without hashing: guessing costs the guesser time, and the server nothing
            self._throttle.failed(keys, now)
            await asyncio.to_thread(auth.record_failure, self.station.engine, name, client, True)
            response = page("login.html", 429, csrf=form.get("csrf"), next=local_next(str(form.get("next", ""))),
                            failed=True)
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        token = await asyncio.get_running_loop().run_in_executor(  # argon2 on its own threads, not the shared pool
            self._hash_pool, auth.log_in, self.station.engine, name, str(form.get("password", "")),
            self.station.settings.session_hours)
        if token is None:
            self._throttle.failed(keys, time.monotonic())
            await asyncio.to_thread(auth.record_failure, self.station.engine, name, client, False)
            return await self.login_form(request, str(form.get("next", "")), failed=True)
        self._throttle.succeeded(keys)
        response = redirect(local_next(str(form.get("next", ""))))
        self._set_cookie(response, request, SESSION_COOKIE, token, int(self.station.settings.session_hours * 3600))
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    async def logout(self, request: Request):
        who = await self.require(request)
        self.check_csrf(who, await request.form(max_files=0, max_fields=4))
        await asyncio.to_thread(auth.log_out, self.station.engine, request.cookies.get(SESSION_COOKIE))
        response = redirect(PREFIX + "/login")
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    async def worklist(self, request: Request, status: str = "pending", sort: str = "confidence",
                       order: str = "asc", predicted: str = "", page_no: int = Query(0, ge=0, le=MAX_PAGE),
                       saved: int | None = None):
        who = await self.require(request)
        query = worklist.Query(status if status in worklist.STATUSES else "pending",
                               sort if sort in worklist.SORTS else "confidence", order == "desc", predicted or None,
                               max(0, page_no))
        station = self.station
        rows, counts = await asyncio.gather(asyncio.to_thread(worklist.list_items, station.engine, query),
                                            asyncio.to_thread(worklist.counts, station.engine))
        identity, contract, evaluation = station.model_facts()
        checks = await asyncio.to_thread(panel, station.engine, evaluation, station.rule(contract, evaluation),
                                         station.settings.monitor)
        return page("worklist.html", who=who, rows=rows, counts=counts, query=query, statuses=worklist.STATUSES,
                    classes=contract["class_names"], checks=checks, model=identity,
                    limits=station.settings.monitor, page_size=worklist.PAGE, **await self._shared(who, saved),
                    max_files=station.service.settings.max_files,
                    max_bytes=int(station.service.settings.max_upload_mb * 2**20))

    async def studies(self, request: Request, status: str = "pending", predicted: str = "",
                      page_no: int = Query(0, ge=0, le=MAX_PAGE)):
        """The study worklist: one row per study or upload batch, its series beneath it, studies.PAGE a page."""
        who = await self.require(request)
        station = self.station
        status = status if status in studies.STUDY_FILTERS else "pending"
        rows = await asyncio.to_thread(studies.study_rows, station.engine, station.files.path, station.series_rule,
                                       status, station.settings.patient_id, station.keep_identity, predicted or None)
        shown_rows = rows[page_no * studies.PAGE:(page_no + 1) * studies.PAGE]
        return page("studies.html", who=who, studies=shown_rows, shown=status, filters=studies.STUDY_FILTERS,
                    page_no=page_no, page_size=studies.PAGE, more=len(rows) > (page_no + 1) * studies.PAGE,
                    n_studies=len(rows),
                    predicted=predicted, classes=station.model_about()["classes"],
                    keep_identity=station.keep_identity, **await self._shared(who))

    async def upload(self, request: Request):
        who = await self.require(request)
        limit = self.station.service.settings.max_files
        try:
            uploads, fields = await read_form(request, limit)
        except StarletteHTTPException as exc:  # the form itself was refused: said as a sentence, never as raw JSON
            return page("uploaded.html", exc.status_code, who=who, results=[],
                        problem=intake.form_problem(exc.status_code, str(exc.detail), limit), **await self._shared(who))
        self.check_csrf(who, fields)
        results = await self.station.upload(uploads, who.name, request.client.host if request.client else None)
        made = [r for r in results if r.case_id]
        if made and len(made) == len(results):
            return redirect(f"{PREFIX}/case/{made[0].case_id}")
        return page("uploaded.html", 422 if not made else 200, who=who, results=results, problem=None,
                    **await self._shared(who))

    async def _shared(self, who: auth.Reviewer, saved: int | None = None) -> dict:
        """What every signed-in page shows: the served model's classes and data, and the verdict just saved."""
        said = await asyncio.to_thread(worklist.saved_verdict, self.station.engine, saved, who.id) if saved else None
        return {"about": self.station.model_about(), "saved": said, "undo_seconds": self.station.settings.undo_seconds}

    async def case(self, request: Request, case_id: str, frame: int | None = None, saved: int | None = None):
        who = await self.require(request)
        engine = self.station.engine
        case, entries, past = await asyncio.gather(asyncio.to_thread(worklist.case_row, engine, case_id),
                                                   asyncio.to_thread(worklist.case_items, engine, case_id),
                                                   asyncio.to_thread(worklist.history, engine, case_id))
        if case is None or not entries:
            return page("missing.html", 404, who=who)
        item = next((e for e in entries if (e["frame"] or 1) == (frame or 1)), entries[0])
        identity, _, evaluation = self.station.model_facts()
        classes = list(item["probabilities"])
        return page("case.html", who=who, case=case, item=item, items=entries, history=past, model=identity,
                    evaluation=evaluation if identity["version"] == item["model_version"] else None,
                    classes=classes, findings=intake.finding_choices(classes), labels=worklist.LABELS,
                    **await self._shared(who, saved))

    async def slice(self, request: Request, case_id: str, frame: int | None = Query(None, ge=1, le=MAX_FRAME)):
        await self.require(request)
        case = await asyncio.to_thread(worklist.case_row, self.station.engine, case_id)
        if case is None or not case["file_ref"]:
            raise HTTPException(404, "no such case")
        try:
            return png(await asyncio.to_thread(self.station.slice_png, case["file_ref"], frame))
        except ImageReadError:  # a frame the file does not have
            raise HTTPException(404, "no such frame") from None

    async def series(self, request: Request, case_id: str):
        """The viewer's data: the ordered slices of the case's series and the series' reading."""
        await self.require(request)
        data = await asyncio.to_thread(viewer.viewer_data, self.station.engine, case_id, self.station.files.path,
                                      self.station.series_rule)
        if data is None:
            raise HTTPException(404, "no such case")
        first = await asyncio.to_thread(worklist.case_row, self.station.engine, data["slices"][0]["case_id"])
        station = self.station
        data["study"] = studies.shown_facts(station.files.path(first["file_ref"]), station.settings.patient_id,
                                            station.keep_identity) if first and first["file_ref"] else {}
        return JSONResponse(data, headers=SECURITY_HEADERS)

    async def pixels(self, request: Request, case_id: str, frame: int | None = Query(None, ge=1, le=MAX_FRAME)):
        """One slice's values (float32, little-endian, row-major) for windowing in the viewer; sizes and the
        file's window in headers."""
        await self.require(request)
        case = await asyncio.to_thread(worklist.case_row, self.station.engine, case_id)
        if case is None or not case["file_ref"]:
            raise HTTPException(404, "no such case")
        try:
            px = await asyncio.to_thread(viewer.slice_pixels, self.station.files.path(case["file_ref"]), frame)
        except ImageReadError:
            raise HTTPException(404, "no such frame") from None
        return Response(px.values.tobytes(), media_type="application/octet-stream",
                        headers={**SECURITY_HEADERS, **px.headers()})

    async def heatmap(self, request: Request, prediction_id: str):
        await self.require(request)
        try:
            data = await self.station.heatmap_png(prediction_id)
        except ValueError:
            data = None
        if data is None:
            raise HTTPException(404, "no such prediction")
        return png(data)

    async def heatmap_facts(self, request: Request, prediction_id: str):
        await self.require(request)
        try:
            facts = await self.station.heatmap_facts(prediction_id)
        except ValueError:
            facts = None
        if facts is None:
            raise HTTPException(404, "no such prediction")
        return JSONResponse(facts, headers=SECURITY_HEADERS)

    async def verdict(self, request: Request, case_id: str):
        who = await self.require(request)
        fields = await request.form(max_files=0, max_fields=16 + MAX_FLAGS)
        self.check_csrf(who, fields)
        verdict = intake.verdict_from_form(fields)
        engine = self.station.engine
        series = await asyncio.to_thread(viewer.series_judged, engine, case_id, self.station.files.path,
                                       self.station.series_rule) \
            if fields.get("series") == "1" else None  # the viewer's verdict: on the whole series
        try:
            vid = await asyncio.to_thread(worklist.record_verdict, engine, verdict, who.id, who.name, series)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        following = await asyncio.to_thread(worklist.next_pending, self.station.engine, verdict.prediction_id)
        if following is None:
            return redirect(f"{PREFIX}/?status=reviewed&saved={vid}")
        return redirect(case_url(following, saved=vid))

    async def undo(self, request: Request, verdict_id: int):
        who = await self.require(request)
        self.check_csrf(who, await request.form(max_files=0, max_fields=4))
        try:
            back = await asyncio.to_thread(worklist.withdraw, self.station.engine, verdict_id, who.id,
                                           self.station.settings.undo_seconds)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return redirect(case_url(back))

    async def step(self, request: Request, prediction_id: str, direction: str):
        """Skip to the next pending item, or back to the previous one, in the worklist's default order."""
        await self.require(request)
        if direction not in ("skip", "previous"):
            raise HTTPException(404)
        there = await asyncio.to_thread(worklist.neighbour, self.station.engine, prediction_id,
                                        direction == "skip", direction == "skip")
        return redirect(case_url(there) if there else PREFIX + "/")


def case_url(item: dict, **query) -> str:
    """The case view of one worklist item (its frame), with extra query fields."""
    fields = {**({"frame": item["frame"]} if item.get("frame") else {}), **query}
    return f"{PREFIX}/case/{item['case_id']}" + (f"?{urlencode(fields)}" if fields else "")
