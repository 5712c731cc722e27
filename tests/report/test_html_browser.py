"""report.html in a real headless Chromium (Debian's, driven by Playwright): it opens from disk with no console
error, no request leaves the file, its plots are drawn, and hostile names run no script.

The `browser` fixture (tests/conftest.py) skips without chromium or Playwright, unless QUANTSAFE_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_html import HOSTILE, study  # the same studies as the HTML tests (pytest puts this folder on the path)

from quantsafe.report.html import render_html


def _open(browser: Any, path: Path) -> tuple[Any, list[str], list[str]]:
    """The page, its console errors and uncaught exceptions, and every URL it requested besides itself."""
    page = browser.new_page(viewport={"width": 1200, "height": 1600})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if r.url != path.as_uri() else None)
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors, requests


def test_report_opens_with_visible_plots(browser: Any, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text(render_html(**study()), encoding="utf-8")
    page, errors, requests = _open(browser, path)
    assert errors == [] and requests == []
    plots = page.locator("figure svg")
    assert plots.count() == 4
    for i in range(plots.count()):
        box = plots.nth(i).bounding_box()
        assert plots.nth(i).is_visible() and box is not None and box["width"] > 300 and box["height"] > 150
    assert page.get_by_text("effective bits per weight").first.is_visible()  # SVG text is laid out as text
    page.close()


def test_hostile_names_run_no_script(browser: Any, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    model = "<img src=x onerror=\"document.title='pwned'\">"
    path.write_text(render_html(**study(model=model, scenario=HOSTILE, n=12)), encoding="utf-8")
    page, errors, requests = _open(browser, path)
    assert errors == [] and requests == []  # no alert() dialog, no fetch of "x"
    assert page.title() == "quantsafe report: demo" and page.locator("img").count() == 0
    assert page.get_by_text(model).first.is_visible()
    page.close()
