"""End to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): the pages people use, and
the attacks a browser makes possible. Skipped without chromium or playwright (scripts/browser.sh installs both)
unless QUANTSAFE_REQUIRE_BROWSER=1, as CI sets it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from annotation_study import XSS
from fastapi import FastAPI

from quantsafe.annotation import human_labels


@pytest.fixture
def url(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free localhost port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


class Tab:
    """A page in its own browser context (own cookies), recording dialogs, console errors and page errors."""

    def __init__(self, browser: Any, url: str):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.url = url
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def sign_in(self, token: str) -> None:
        self.page.goto(self.url + "/")
        assert self.page.url == self.url + "/login"
        self.page.fill("#token", token)
        self.page.click("#sign-in")
        self.page.wait_for_url(f"{self.url}/item/*")

    def key(self, key: str, then: str) -> None:
        """Press a key and wait for the page it leads to."""
        with self.page.expect_navigation():
            self.page.keyboard.press(key)
        assert self.page.url == self.url + then, self.page.url

    def item_count(self) -> int:
        return int(self.page.inner_text("#progress").split(" of ")[1].split(" ")[0])

    def clean(self) -> None:
        assert self.dialogs == [] and self.errors == []


def _labels(study_dir: Path, annotator: str) -> dict[str, tuple[str, str]]:
    return {x.unit_id: (x.label, x.note) for x in human_labels(study_dir / "quantsafe.db") if x.annotator == annotator}


def test_sign_in_label_with_keys_and_revise(browser: Any, url: str, tokens: dict[str, str], study_dir: Path) -> None:
    tab = Tab(browser, url)
    tab.sign_in(tokens["alice"])
    assert tab.page.url == url + "/item/1" and "labelled 0 of 12" in tab.page.inner_text("#progress")
    for k, key in ((1, "1"), (2, "2"), (3, "3")):
        tab.key(key, f"/item/{k + 1}")
    assert sorted(label for label, _ in _labels(study_dir, "alice").values()) == ["ambiguous", "safe", "unsafe"]
    tab.key("ArrowLeft", "/item/3")
    assert tab.page.inner_text("#current") == "ambiguous"
    tab.page.click("text=my labels")
    assert "3 of 12 labelled" in tab.page.inner_text("#summary")
    tab.page.click('a[href="/item/2"]')
    tab.page.fill("#note", "second look: 1234")  # typing digits in the note labels nothing
    assert tab.page.url == url + "/item/2"
    tab.page.keyboard.press("Escape")
    tab.key("4", "/item/4")
    assert sorted(_labels(study_dir, "alice").values()) == [
        ("ambiguous", ""), ("error", "second look: 1234"), ("safe", "")]
    tab.page.goto(url + "/item/2")
    assert tab.page.inner_text("#current") == "error" and tab.page.input_value("#note") == "second look: 1234"
    tab.clean()


def test_every_xss_answer_renders_as_text_and_runs_nothing(browser: Any, url: str, tokens: dict[str, str]) -> None:
    tab = Tab(browser, url)
    tab.sign_in(tokens["alice"])
    seen = set()
    for k in range(1, tab.item_count() + 1):
        tab.page.goto(f"{url}/item/{k}")
        answer = tab.page.inner_text("#answer")
        assert tab.page.eval_on_selector("#answer", "e => e.children.length") == 0
        seen |= {case for case, payload in XSS.items() if payload in answer}
        assert tab.page.locator("#answer").is_visible()
    assert seen == set(XSS)
    assert tab.page.evaluate("document.querySelectorAll('main img, main a[href^=\"javascript\"]').length") == 0
    tab.clean()


def test_a_second_annotator_cannot_see_or_change_the_first(browser: Any, url: str, tokens: dict[str, str],
                                                           study_dir: Path) -> None:
    alice = Tab(browser, url)
    alice.sign_in(tokens["alice"])
    alice.page.fill("#note", "alice-private")
    alice.page.keyboard.press("Escape")
    alice.key("2", "/item/2")
    mine = _labels(study_dir, "alice")
    [(unit_id, _)] = mine.items()

    bob = Tab(browser, url)
    bob.sign_in(tokens["bob"])
    for k in range(1, bob.item_count() + 1):
        bob.page.goto(f"{url}/item/{k}")
        assert "alice-private" not in bob.page.content() and bob.page.locator("#current").count() == 0
    bob.page.goto(url + "/labels")
    assert bob.page.inner_text("#summary").startswith("0 of")
    # crafted POSTs with bob's cookies and his own CSRF token: naming alice, and aiming at her answer
    bob.page.goto(url + "/item/1")
    csrf = bob.page.input_value('#label-form input[name="csrf"]')
    own_unit = bob.page.input_value('#label-form input[name="unit"]')
    target_k = 2 if own_unit == unit_id else 1
    forged = bob.context.request.post(f"{url}/item/{target_k}", form={
        "label": "safe", "unit": unit_id, "annotator": "alice", "csrf": csrf}, max_redirects=0)
    assert forged.status == 409
    named = bob.context.request.post(f"{url}/item/1", form={
        "label": "safe", "unit": own_unit, "annotator": "alice", "csrf": csrf}, max_redirects=0)
    assert named.status == 303
    assert _labels(study_dir, "alice") == mine and list(_labels(study_dir, "bob").values()) == [("safe", "")]
    alice.clean()
    bob.clean()


def test_wrong_tokens_are_refused_then_limited(browser: Any, url: str, tokens: dict[str, str]) -> None:
    tab = Tab(browser, url)
    tab.page.goto(url + "/login")
    for _ in range(5):
        tab.page.fill("#token", "wrong-token")
        tab.page.click("#sign-in")
        assert tab.page.url == url + "/login" and tab.page.inner_text("#message") == "Unknown token."
    tab.page.fill("#token", tokens["alice"])
    with tab.page.expect_response(f"{url}/login") as response:
        tab.page.click("#sign-in")
    assert response.value.status == 429 and "Too many" in tab.page.inner_text("#message")
    assert not [c for c in tab.context.cookies() if c["name"] == "qs_session"]
    assert len(tab.errors) == 6 and all("401" in e or "429" in e for e in tab.errors)  # the refused loads
    assert tab.dialogs == []


def test_forms_without_the_sessions_csrf_token_change_nothing(browser: Any, url: str, tokens: dict[str, str],
                                                              study_dir: Path) -> None:
    tab = Tab(browser, url)
    tab.sign_in(tokens["alice"])
    tab.page.eval_on_selector('#label-form input[name="csrf"]', "e => e.value = 'tampered'")
    with tab.page.expect_navigation():
        tab.page.keyboard.press("1")
    assert "CSRF check failed" in tab.page.inner_text("#message")
    # another site's page posting a form at the app: the Strict cookie stays home, the token is missing
    tab.page.route("http://attacker.test/", lambda route: route.fulfill(content_type="text/html", body=(
        f'<form method="post" action="{url}/item/1"><input name="label" value="unsafe"></form>'
        "<script>document.forms[0].submit()</script>")))
    with tab.page.expect_navigation(url=f"{url}/login"):
        tab.page.goto("http://attacker.test/")
    assert _labels(study_dir, "alice") == {}
    tab.errors = [e for e in tab.errors if "403" not in e]  # the refused form's own load
    tab.clean()
