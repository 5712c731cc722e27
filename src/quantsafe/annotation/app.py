"""`quantsafe annotate serve`: people label a study's answers in a browser, one key per label.

Every page needs a live server-side session; an annotator's identity comes only from it (never from a URL or a
form field), so nobody can read or write another's labels. Answers are attacker-controlled text: pages escape
everything and the Content-Security-Policy runs only the page's own nonce'd script.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime, and `SignedIn` is local.
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from quantsafe.annotation.queue import DEFAULT_SAMPLE, annotator_order, choose_sample
from quantsafe.annotation.security import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    RateLimiter,
    same_secret,
    security_headers,
)
from quantsafe.annotation.store import LABELS, AnnotationStore, HumanLabel, SampleItem, Session, Unit
from quantsafe.annotation.templates import render
from quantsafe.benchmarks import load_criteria
from quantsafe.datadir import resolve_data_dir
from quantsafe.errors import QuantsafeError
from quantsafe.judges.base import Verdict

MAX_NOTE = 2000
KEYS = tuple(zip("1234", LABELS, strict=True))


class AppConfig(BaseModel):
    """How `serve` runs; the defaults suit a few people on a trusted network for an afternoon."""

    db_path: Path
    study: str | None = None  # default: the study run last in the store
    session_ttl_s: float = Field(8 * 3600, gt=0)
    max_failures: int = Field(5, ge=1)  # failed sign-ins per client and window before 429
    failure_window_s: float = Field(300, gt=0)
    secure_cookie: bool = False  # set when served behind HTTPS
    data_dir: Path | None = None  # for the scenarios' criteria (without it pages show the scenario only)
    sample_size: int = Field(DEFAULT_SAMPLE, ge=1)  # used when the study has no sample yet
    seed: int = 0


class SignInRequired(Exception):
    """No live session: every route answers with the sign-in page."""


class Refused(Exception):
    """A request this annotator may not make, or one that no longer fits the sample: a page saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _criteria(data_dir: Path | None) -> dict[str, str]:
    try:
        return load_criteria(resolve_data_dir(data_dir))
    except QuantsafeError:
        return {}


def first_open(items: list[SampleItem], labelled: set[str], after: int = 0) -> int | None:
    """1-based position of the next unlabelled item after position `after`, wrapping around."""
    for step in range(len(items)):
        k = (after + step) % len(items)
        if items[k].unit_id not in labelled:
            return k + 1
    return None


def create_app(config: AppConfig, clock: Callable[[], float] = time.time) -> FastAPI:
    """The annotation app over one study's store; `clock` lets tests age sessions and sign-in failures."""
    annotations = AnnotationStore(config.db_path)
    record = annotations.store.study(config.study)
    study_id = record.study_id
    if not annotations.sample(study_id):
        annotations.set_sample(study_id, choose_sample(annotations, record, config.sample_size, config.seed))
    criteria = _criteria(config.data_dir)
    limiter = RateLimiter(config.max_failures, config.failure_window_s, clock)
    app = FastAPI(title="quantsafe annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.annotations = annotations

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.nonce = secrets.token_urlsafe(16)
        response = await call_next(request)
        response.headers.update(security_headers(request.state.nonce))
        return response

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def page(request: Request, name: str, status: int = 200, session: Session | None = None,
             **context: object) -> HTMLResponse:
        html = render(name, nonce=request.state.nonce, annotator=session.annotator if session else None,
                      csrf=session.csrf if session else "", **context)
        return HTMLResponse(html, status_code=status)

    def current(request: Request) -> Session:
        """A dependency, so a request without a live session is turned away before its form is even read."""
        session_id = request.cookies.get(SESSION_COOKIE)
        session = annotations.session(session_id, clock()) if session_id else None
        if session is None:
            raise SignInRequired
        return session

    SignedIn = Annotated[Session, Depends(current)]

    def check_csrf(session: Session, csrf: str | None) -> None:
        if not same_secret(csrf, session.csrf):
            raise Refused(403, "This form is stale or was not sent by this app (CSRF check failed); reload the page.")

    def queue(annotator: str) -> list[SampleItem]:
        return annotator_order(annotations.sample(study_id), annotator, study_id)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return page(request, "message", exc.status, title="Refused", message=exc.message)

    def login_form(request: Request, message: str | None, status: int) -> Response:
        token = secrets.token_urlsafe(32)
        response = page(request, "login", status, title="Sign in", login_csrf=token, message=message)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=config.secure_cookie,
                            path="/login")
        return response

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        return login_form(request, None, 200)

    @app.post("/login")
    def login(request: Request, token: Annotated[str, Form(max_length=200)],
              csrf: Annotated[str, Form(max_length=200)]) -> Response:
        client = request.client.host if request.client else "?"
        wait = limiter.retry_after(client)
        if wait is not None:
            limited = page(request, "message", 429, title="Too many attempts",
                           message=f"Too many wrong tokens from this address; try again in {wait:.0f} s.")
            limited.headers["Retry-After"] = str(int(wait) + 1)
            return limited
        if not same_secret(csrf, request.cookies.get(LOGIN_COOKIE)):
            return login_form(request, "The sign-in form expired; please try again.", 403)
        name = annotations.check_token(token)
        if name is None:
            limiter.failed(client)
            return login_form(request, "Unknown token.", 401)
        session_id, _ = annotations.new_session(name, config.session_ttl_s, clock())
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_id, max_age=int(config.session_ttl_s), httponly=True,
                            samesite="strict", secure=config.secure_cookie, path="/")
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    @app.post("/logout")
    def logout(request: Request, session: SignedIn, csrf: Annotated[str | None, Form()] = None) -> Response:
        check_csrf(session, csrf)
        annotations.end_session(request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/")
    def home(session: SignedIn) -> Response:
        items = queue(session.annotator)
        labelled = {x.unit_id for x in annotations.labels(session.annotator)}
        k = first_open(items, labelled)
        return RedirectResponse(f"/item/{k}" if k else "/labels", status_code=303)

    @app.get("/item/{k}", response_class=HTMLResponse)
    def item(request: Request, session: SignedIn, k: int) -> Response:
        items = queue(session.annotator)
        if not 1 <= k <= len(items):
            raise Refused(404, f"There is no item {k} (the sample has {len(items)}).")
        unit = items[k - 1]
        shown = annotations.shown(unit)
        if shown is None:
            raise Refused(404, "This answer is no longer in the store.")
        mine = {x.unit_id: x for x in annotations.labels(session.annotator)}
        done = sum(i.unit_id in mine for i in items)
        own = mine.get(unit.unit_id)
        return page(request, "item", session=session, title=f"Item {k}", k=k, n=len(items), done=done, item=shown,
                    criterion=criteria.get(shown.scenario), keys=KEYS, current=own.label if own else None,
                    note=own.note if own else "", max_note=MAX_NOTE)

    @app.post("/item/{k}")
    def label(session: SignedIn, k: int, label: Annotated[Verdict, Form()], unit: Annotated[str, Form(max_length=64)],
              note: Annotated[str, Form(max_length=MAX_NOTE)] = "",
              csrf: Annotated[str | None, Form()] = None) -> Response:
        check_csrf(session, csrf)
        items = queue(session.annotator)
        if not 1 <= k <= len(items) or items[k - 1].unit_id != unit:
            raise Refused(409, "The sample changed since this page was loaded; nothing was saved. Reload it.")
        target = items[k - 1]
        annotations.put_label(HumanLabel(**target.model_dump(include=set(Unit.model_fields)),
                                         annotator=session.annotator, label=label, note=note.strip()), clock())
        labelled = {x.unit_id for x in annotations.labels(session.annotator)}
        after = first_open(items, labelled, k)
        return RedirectResponse(f"/item/{after}" if after else "/labels", status_code=303)

    @app.get("/labels", response_class=HTMLResponse)
    def labels(request: Request, session: SignedIn) -> Response:
        items = queue(session.annotator)
        mine = {x.unit_id: x for x in annotations.labels(session.annotator)}
        rows = []
        for k, unit in enumerate(items, 1):
            if unit.unit_id in mine and (shown := annotations.shown(unit)) is not None:
                rows.append({"k": k, "scenario": shown.scenario, "prompt": shown.prompt,
                             "label": mine[unit.unit_id].label, "note": mine[unit.unit_id].note})
        return page(request, "labels", session=session, title="My labels", rows=rows, n=len(items),
                    next_k=first_open(items, set(mine)))

    return app
