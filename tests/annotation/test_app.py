"""The annotation app's security cases and labelling flow, through FastAPI's TestClient (no browser)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from annotation_study import XSS, Clock, form_value, make_app, sign_in, signed_in
from fastapi import FastAPI
from fastapi.testclient import TestClient
from markupsafe import escape

from quantsafe.annotation import AnnotationStore, human_labels
from quantsafe.annotation import store as annotation_store


def _label(client: TestClient, k: int, label: str, note: str = "", **extra: str) -> int:
    page = client.get(f"/item/{k}")
    data = {"label": label, "note": note, "unit": form_value(page.text, "unit"),
            "csrf": form_value(page.text, "csrf")} | extra
    return client.post(f"/item/{k}", data=data, follow_redirects=False).status_code


def _labels(study_dir: Path, annotator: str) -> dict[str, tuple[str, str]]:
    return {x.unit_id: (x.label, x.note) for x in human_labels(study_dir / "quantsafe.db") if x.annotator == annotator}


def test_nothing_is_readable_without_a_session(client: TestClient, study_dir: Path) -> None:
    for path in ("/", "/item/1", "/labels", "/docs", "/openapi.json", "/redoc"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code in (303, 404), path
        assert response.status_code == 404 or response.headers["location"] == "/login"
        assert "answer" not in response.text.lower()
    forged = client.post("/item/1", data={"label": "safe", "unit": "x", "csrf": "x"}, follow_redirects=False)
    assert forged.status_code == 303 and forged.headers["location"] == "/login"
    client.cookies.set("qs_session", "made-up")
    assert client.get("/item/1", follow_redirects=False).headers["location"] == "/login"
    assert human_labels(study_dir / "quantsafe.db") == []


def test_sign_in_sets_a_strict_http_only_session_cookie(client: TestClient, tokens: dict[str, str]) -> None:
    response = sign_in(client, tokens["alice"])
    assert response.status_code == 303
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("qs_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = client.get("/")
    assert page.status_code == 200 and re.search(r'id="annotator">alice<', page.text)


def test_a_wrong_token_is_refused_then_rate_limited(client: TestClient, tokens: dict[str, str],
                                                    clock: Clock) -> None:
    for _ in range(5):
        response = sign_in(client, "not-a-token")
        assert response.status_code == 401 and "Unknown token" in response.text
    limited = sign_in(client, tokens["alice"])  # even the right token waits out the window
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert "qs_session" not in client.cookies
    clock.now += 301
    assert sign_in(client, tokens["alice"]).status_code == 303


def test_sign_in_form_needs_its_csrf_cookie(client: TestClient, tokens: dict[str, str]) -> None:
    page = client.get("/login")
    csrf = form_value(page.text, "csrf")
    client.cookies.clear()  # a cross-site form post carries no (SameSite=Strict) cookie
    response = client.post("/login", data={"token": tokens["alice"], "csrf": csrf}, follow_redirects=False)
    assert response.status_code == 403 and "qs_session" not in response.headers.get("set-cookie", "")
    client.get("/login")
    response = client.post("/login", data={"token": tokens["alice"], "csrf": ""}, follow_redirects=False)
    assert response.status_code in (403, 422)


def test_label_posts_need_the_sessions_own_csrf_token(alice: TestClient, bob: TestClient, study_dir: Path) -> None:
    page = alice.get("/item/1")
    unit = form_value(page.text, "unit")
    for csrf in (None, "", "guess", form_value(bob.get("/item/1").text, "csrf")):
        data = {"label": "unsafe", "unit": unit} | ({"csrf": csrf} if csrf is not None else {})
        response = alice.post("/item/1", data=data, follow_redirects=False)
        assert response.status_code == 403 and "CSRF" in response.text
    assert alice.post("/logout", data={"csrf": "guess"}).status_code == 403
    assert _labels(study_dir, "alice") == {}
    assert _label(alice, 1, "unsafe") == 303 and len(_labels(study_dir, "alice")) == 1


def test_sessions_expire_and_sign_out_ends_them(app: FastAPI, tokens: dict[str, str], clock: Clock,
                                                study_dir: Path) -> None:
    alice = signed_in(app, tokens["alice"])
    clock.now += 8 * 3600 - 1
    assert alice.get("/item/1", follow_redirects=False).status_code == 200
    clock.now += 2
    assert alice.get("/item/1", follow_redirects=False).headers["location"] == "/login"
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        assert annotations.conn.execute("SELECT count(*) FROM annotation_sessions").fetchone()[0] == 0
    short = make_app(study_dir, clock, session_ttl_s=60)
    again = TestClient(short)
    assert "Max-Age=60" in sign_in(again, tokens["alice"]).headers["set-cookie"]
    old = again.cookies["qs_session"]
    csrf = form_value(again.get("/item/1").text, "csrf")
    assert again.post("/logout", data={"csrf": csrf}, follow_redirects=False).headers["location"] == "/login"
    again.cookies.set("qs_session", old)
    assert again.get("/item/1", follow_redirects=False).headers["location"] == "/login"
    clock.now += 61
    assert signed_in(short, tokens["alice"]).get("/labels").status_code == 200


def test_annotators_cannot_read_or_change_each_others_labels(alice: TestClient, bob: TestClient,
                                                             study_dir: Path) -> None:
    assert _label(alice, 1, "unsafe", "alice-secret-note") == 303
    mine = _labels(study_dir, "alice")
    [(unit_id, _)] = mine.items()
    # bob's pages: his own queue, no trace of alice's label or note
    n = int(re.search(r"of (\d+)", bob.get("/item/1").text).group(1))
    for k in range(1, n + 1):
        text = bob.get(f"/item/{k}").text
        assert "alice-secret-note" not in text and 'id="current"' not in text
    assert "alice-secret-note" not in bob.get("/labels").text and "0 of" in bob.get("/labels").text
    # crafted POSTs: naming alice, or aiming at her unit from a position where bob's queue has another answer
    bob_k = next(k for k in range(1, n + 1) if form_value(bob.get(f"/item/{k}").text, "unit") == unit_id)
    assert _label(bob, bob_k, "safe", "bob", annotator="alice") == 303
    other_k = 1 if bob_k != 1 else 2
    page = bob.get(f"/item/{other_k}")
    forged = bob.post(f"/item/{other_k}", data={"label": "safe", "unit": unit_id, "annotator": "alice",
                                                 "csrf": form_value(page.text, "csrf")}, follow_redirects=False)
    assert forged.status_code == 409
    assert _labels(study_dir, "alice") == mine
    assert _labels(study_dir, "bob") == {unit_id: ("safe", "bob")}
    assert "alice-secret-note" in alice.get("/labels").text


@pytest.mark.parametrize("case", sorted(XSS))
def test_model_text_is_escaped(alice: TestClient, case: str) -> None:
    payload = XSS[case]
    n = int(re.search(r"of (\d+)", alice.get("/item/1").text).group(1))
    marker = f"(answer q4/p{list(XSS).index(case)})"
    [page] = [text for k in range(1, n + 1) if marker in (text := alice.get(f"/item/{k}").text)]
    assert payload not in page and str(escape(payload)) in page
    for raw in ("<script>alert", "<img", "<a href=\"javascript", "</pre></main>"):
        assert raw not in page
    assert page.count("<script") == 1  # only the app's own, nonce'd keyboard script
    assert "{{ 7 * 7 }}" in page or case != "breakout"


def test_security_headers_and_nonce(client: TestClient, alice: TestClient) -> None:
    for response in (client.get("/login"), alice.get("/item/1"), alice.get("/labels")):
        csp = response.headers["content-security-policy"]
        nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        assert all(tag == nonce for tag in re.findall(r'<(?:script|style) nonce="([^"]+)"', response.text))
    assert client.get("/login").headers["content-security-policy"] != client.get("/login").headers[
        "content-security-policy"]  # a fresh nonce per response


def test_tokens_are_stored_hashed_and_compared_against_every_annotator(
        study_dir: Path, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    raw = b"".join(p.read_bytes() for p in study_dir.glob("quantsafe.db*"))
    assert not any(t.encode() in raw for t in tokens.values())
    calls: list[tuple[str, str]] = []
    real = annotation_store.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(annotation_store.hmac, "compare_digest", spy)
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        assert annotations.check_token(tokens["alice"]) == "alice"
        assert len(calls) == 2  # no early exit on the first match
        assert annotations.check_token("x" * 43) is None and len(calls) == 4


def test_labelling_flow_revise_and_resume(app: FastAPI, alice: TestClient, study_dir: Path, tokens: dict[str, str],
                                          clock: Clock) -> None:
    assert alice.get("/", follow_redirects=False).headers["location"] == "/item/1"
    assert "item 1 of 12 · labelled 0 of 12" in alice.get("/item/1").text
    response = alice.post("/item/1", data={"label": "pwned", "unit": "u", "csrf": "c"}, follow_redirects=False)
    assert response.status_code == 422
    for k, label in ((1, "safe"), (2, "unsafe"), (3, "ambiguous")):
        page = alice.get(f"/item/{k}")
        response = alice.post(f"/item/{k}", data={"label": label, "unit": form_value(page.text, "unit"),
                                                  "csrf": form_value(page.text, "csrf")}, follow_redirects=False)
        assert response.headers["location"] == f"/item/{k + 1}"
        assert len(_labels(study_dir, "alice")) == k  # durable on every answer, read by a second connection
    assert _label(alice, 2, "error", "revised: empty answer") == 303
    assert sorted(v for v in _labels(study_dir, "alice").values()) == [
        ("ambiguous", ""), ("error", "revised: empty answer"), ("safe", "")]
    assert 'id="current">error<' in alice.get("/item/2").text
    listing = alice.get("/labels").text
    assert "3 of 12 labelled" in listing and 'href="/item/2"' in listing and "revised: empty answer" in listing
    # a restarted server resumes at the first unlabelled item
    restarted = signed_in(make_app(study_dir, clock), tokens["alice"])
    assert restarted.get("/", follow_redirects=False).headers["location"] == "/item/4"
    assert restarted.get("/item/13").status_code == 404
