"""The app's defences that are not about storage: sign-in throttling, CSRF checks and response headers."""

from __future__ import annotations

import hmac
import threading
from collections import defaultdict, deque
from collections.abc import Callable

SESSION_COOKIE = "qs_session"
LOGIN_COOKIE = "qs_login"  # double-submit CSRF token of the sign-in form (there is no session yet to hold one)


def same_secret(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; a missing or empty value on either side never matches."""
    return bool(given) and bool(expected) and hmac.compare_digest(str(given).encode(), str(expected).encode())


class RateLimiter:
    """At most `max_failures` failed sign-ins per client within a sliding `window_s`; then every try is refused
    until the oldest failure ages out, so guessing tokens costs time even with the right one in the list."""

    def __init__(self, max_failures: int, window_s: float, clock: Callable[[], float]):
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures[client]
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> float | None:
        """Seconds until this client may try again, or None when it may try now."""
        now = self.clock()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return None
            return times[0] + self.window_s - now

    def failed(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            self._recent(client, now).append(now)
            if len(self._failures) > 4096:  # forget idle clients so the table cannot grow without bound
                for key in [k for k, t in self._failures.items() if not self._recent(k, now)]:
                    del self._failures[key]


def security_headers(nonce: str) -> dict[str, str]:
    """Headers of every response: scripts and styles only with this response's nonce, no framing, no sniffing,
    nothing cached (pages hold other people's answers and one's own labels)."""
    return {
        "Content-Security-Policy": (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cache-Control": "no-store",
    }
