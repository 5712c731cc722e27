"""Server-rendered pages. Jinja2 autoescapes every value, so model-written text can only ever be text; the one
inline script and style carry the response's CSP nonce. Kept in Python so the package needs no data files."""

from __future__ import annotations

from typing import Any

from jinja2 import DictLoader, Environment, StrictUndefined

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · quantsafe annotate</title>
<style nonce="{{ nonce }}">
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 0 1rem 2rem; color: #222; }
header { display: flex; gap: 1rem; align-items: baseline; border-bottom: 1px solid #ccc; padding: .6rem 0; }
header .who { margin-left: auto; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; border: 1px solid #ddd; padding: .6rem;
      font: 14px/1.4 ui-monospace, monospace; max-height: 24rem; overflow-y: auto; }
.labels { display: flex; gap: .5rem; margin: .8rem 0; }
.labels button { font-size: 1rem; padding: .45rem .9rem; border: 1px solid #888; border-radius: 4px; background: #fff; }
.labels button.current { background: #234; color: #fff; }
textarea { width: 100%; min-height: 3rem; box-sizing: border-box; }
form.inline { display: inline; }
.error { color: #a00; }
.muted { color: #666; }
table { border-collapse: collapse; width: 100%; }
td, th { border-bottom: 1px solid #ddd; padding: .3rem .4rem; text-align: left; vertical-align: top; }
nav { display: flex; justify-content: space-between; }
</style></head>
<body>
<header><strong>quantsafe annotate</strong>
{% if annotator %}<span class="who">signed in as <b id="annotator">{{ annotator }}</b> ·
<a href="/labels">my labels</a> ·
<form class="inline" method="post" action="/logout"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit">sign out</button></form></span>{% endif %}
</header>
<main>{% block main %}{% endblock %}</main>
{% block script %}{% endblock %}
</body></html>
"""

_LOGIN = """{% extends "base" %}{% block main %}
<h1>Sign in</h1>
<p>Paste the personal token you were given (<code>quantsafe annotate add-annotator</code> prints it once).</p>
{% if message %}<p class="error" id="message">{{ message }}</p>{% endif %}
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{{ login_csrf }}">
<input type="password" name="token" id="token" autocomplete="off" size="48" autofocus required>
<button type="submit" id="sign-in">sign in</button>
</form>
{% endblock %}"""

_ITEM = """{% extends "base" %}{% block main %}
<p class="muted" id="progress">item {{ k }} of {{ n }} · labelled {{ done }} of {{ n }}</p>
<h2>Scenario: <span id="scenario">{{ item.scenario }}</span></h2>
{% if criterion %}<p id="criterion">{{ criterion }}</p>{% endif %}
<h3>Prompt</h3><pre id="prompt">{{ item.prompt }}</pre>
<h3>Answer</h3><pre id="answer">{{ item.response }}</pre>
<form method="post" action="/item/{{ k }}" id="label-form">
<input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="unit" value="{{ item.unit.unit_id }}">
<label for="note">Note (optional; Esc leaves the box so the keys label again)</label>
<textarea id="note" name="note" maxlength="{{ max_note }}">{{ note }}</textarea>
<div class="labels">{% for key, label in keys %}
<button type="submit" name="label" value="{{ label }}" data-key="{{ key }}"
 {% if label == current %}class="current" aria-pressed="true"{% endif %}>{{ key }} · {{ label }}</button>{% endfor %}
</div>
</form>
<p class="muted">Keys: {% for key, label in keys %}{{ key }} {{ label }}, {% endfor %}← previous, → next.
{% if current %}Your label: <b id="current">{{ current }}</b>.{% endif %}</p>
<nav><span>{% if k > 1 %}<a id="prev" href="/item/{{ k - 1 }}">← previous</a>{% endif %}</span>
<span>{% if k < n %}<a id="next" href="/item/{{ k + 1 }}">next →</a>{% endif %}</span></nav>
{% endblock %}
{% block script %}<script nonce="{{ nonce }}">
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLTextAreaElement) { if (event.key === "Escape") event.target.blur(); return; }
  const button = [...document.querySelectorAll("button[data-key]")].find((b) => b.dataset.key === event.key);
  const link = document.getElementById({ArrowLeft: "prev", ArrowRight: "next"}[event.key] || "");
  if (button || link) { event.preventDefault(); (button || link).click(); }
});
</script>{% endblock %}"""

_LABELS = """{% extends "base" %}{% block main %}
<h1>My labels</h1>
<p id="summary">{{ rows | length }} of {{ n }} labelled.{% if rows | length == n %} All done, thank you.
{% elif next_k %} <a href="/item/{{ next_k }}">Continue</a>.{% endif %}</p>
<table id="labels"><tr><th>#</th><th>scenario</th><th>prompt</th><th>label</th><th>note</th><th></th></tr>
{% for row in rows %}<tr><td>{{ row.k }}</td><td>{{ row.scenario }}</td><td>{{ row.prompt | truncate(80) }}</td>
<td class="label">{{ row.label }}</td><td>{{ row.note | truncate(60) }}</td>
<td><a href="/item/{{ row.k }}">revise</a></td></tr>{% endfor %}
</table>
{% endblock %}"""

_MESSAGE = """{% extends "base" %}{% block main %}<h1>{{ title }}</h1><p id="message">{{ message }}</p>
<p><a href="/">back</a></p>{% endblock %}"""

_ENV = Environment(loader=DictLoader({"base": _BASE, "login": _LOGIN, "item": _ITEM, "labels": _LABELS,
                                      "message": _MESSAGE}),
                   autoescape=True, undefined=StrictUndefined)


def render(name: str, **context: Any) -> str:
    return _ENV.get_template(name).render(**context)
