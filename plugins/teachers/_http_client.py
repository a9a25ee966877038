"""The HTTP side of the ``http_topk`` teacher: one JSON POST with a disk cache, a query budget, a client-side
rate limit, timeouts and retries with exponential backoff and jitter.

Kept apart from torch so that it can be tested alone. The bearer token lives only in this object's memory
(``repr`` hides it) and in the ``Authorization`` header; it is never part of a cache key, a cache file, an error
message or the details the report prints.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from potstill.errors import PotstillError

#: the most characters of a response quoted in an error message
QUOTE = 300


class TeacherHTTPError(PotstillError):
    """The endpoint refused or failed (token, budget, retries spent, malformed answer): the run stops cleanly."""


class BudgetExhausted(TeacherHTTPError):
    """The query budget is spent; ``needed`` uncached queries would still be needed (at least).

    The teacher only sees the current request, so it says "at least 1"; a caller that knows the work left (the
    distill loop: the batches of its remaining steps) counts the uncached ones with the teacher's
    ``uncached_queries(batches)`` and calls :meth:`with_remaining` for the exact figure.
    """

    def __init__(self, message: str, needed: int, fix: str = ""):
        super().__init__(message + (f"; {fix}" if fix else ""))
        self.needed, self.head, self.fix = needed, message.split("; the run needs")[0], fix

    def with_remaining(self, needed: int, what: str) -> "BudgetExhausted":
        """The same error, saying that ``what`` (e.g. "the 7 remaining steps of stage 1") needs ``needed``
        uncached queries (the current one included)."""
        return BudgetExhausted(f"{self.head}; {what} still need {needed} uncached quer{'y' if needed == 1 else 'ies'}",
                               needed, self.fix)


def quote(text: str | bytes, limit: int = QUOTE) -> str:
    """A response body for an error message: at most ``limit`` characters, marked when truncated."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return repr(text[:limit]) + (f" … ({len(text)} characters)" if len(text) > limit else "")


class _Retry(Exception):
    def __init__(self, reason: str, wait: float = 0.0):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


@dataclass
class Counters:
    queries: int = 0  # requests answered by the server (what a paid API bills)
    cache_hits: int = 0
    retries: int = 0
    attempts: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # retried failures by kind


class CachedClient:
    """POST JSON bodies to one endpoint; every answer is cached on disk under the SHA-256 of (endpoint, body).

    ``get(body, validate)`` returns ``validate(answer)``: an answer that fails validation raises (quoted) and
    is not cached. Cache files are written atomically (a temporary file renamed into place), so a killed run
    leaves whole answers or none.
    """

    def __init__(self, endpoint: str, token: str | None, cache: Path | None, budget: int | None = None,
                 rate_limit: float | None = None, timeout_s: float = 30.0, max_retries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, who: str = "http_topk", token_env: str | None = None):
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{who}: url must be http(s)://host:port/..., got {endpoint!r}")
        self.endpoint, self._parts = endpoint, parts
        self._token = token
        self.cache, self.budget, self.rate_limit = cache, budget, rate_limit
        self.timeout_s, self.max_retries, self.backoff_s, self.max_backoff_s = timeout_s, max_retries, backoff_s, max_backoff_s
        self.who, self.token_env = who, token_env
        self.counters = Counters()
        self._random = random.Random()  # jitter: never the global generators, which seed training
        self._lock = threading.Lock()
        self._last_request = 0.0
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"CachedClient({self.endpoint!r}, token=***)"

    # ------------------------------------------------------------------ cache
    def key(self, body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps({"endpoint": self.endpoint, "body": body}, sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return None if self.cache is None else self.cache / key[:2] / f"{key}.json"

    def cached(self, body: dict[str, Any]) -> bool:
        path = self._path(self.key(body))
        return path is not None and path.is_file()

    def cache_entries(self) -> int:
        return 0 if self.cache is None else sum(1 for _ in self.cache.glob("*/*.json"))

    def _store(self, key: str, text: str) -> None:
        path = self._path(key)
        if path is None:
            return
        from potstill.io import write_text

        write_text(path, text)

    # ------------------------------------------------------------------ requests
    def get(self, body: dict[str, Any], validate: Callable[[Any, str], Any], describe: str = "") -> Any:
        key = self.key(body)
        path = self._path(key)
        if path is not None and path.is_file():
            text = path.read_text(encoding="utf-8")
            try:
                value = validate(json.loads(text), text)
            except (TeacherHTTPError, ValueError):
                path.unlink(missing_ok=True)  # a damaged cache file is asked again, never trusted
            else:
                self.counters.cache_hits += 1
                return value
        if self.budget is not None and self.counters.queries >= self.budget:
            where = f"{self.cache_entries()} answers cached in {self.cache}" if self.cache is not None else "no cache"
            raise BudgetExhausted(
                f"{self.who}: query budget of {self.budget} spent ({self.counters.queries} queries this run, {where}); "
                f"the run needs at least 1 more query ({describe or 'the current request'}) and one more for each "
                f"further uncached batch", needed=1,
                fix="raise `budget` and run again (cached answers are not asked again)")
        text = self._post(body)
        try:
            answer = json.loads(text)
        except ValueError:
            raise TeacherHTTPError(f"{self.who}: malformed response from {self.endpoint} (not JSON): {quote(text)}") from None
        value = validate(answer, text)
        self._store(key, text)
        return value

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _pace(self) -> None:
        if not self.rate_limit:
            return
        with self._lock:
            wait = self._last_request + 1.0 / self.rate_limit - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_request = time.monotonic()

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half the delay fixed, half uniform."""
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return delay / 2 + self._random.uniform(0, delay / 2)

    def _post(self, body: dict[str, Any]) -> str:
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.counters.retries += 1
            self._pace()
            self.counters.attempts += 1
            try:
                return self._once(data)
            except _Retry as retry:
                last = retry.reason
                kind = retry.reason.split(":")[0]
                self.counters.failures[kind] = self.counters.failures.get(kind, 0) + 1
                if attempt == self.max_retries:
                    break
                time.sleep(max(retry.wait, self._backoff(attempt)))
        raise TeacherHTTPError(f"{self.who}: {self.endpoint} failed {self.max_retries + 1} times (last: {last}); "
                               f"{self.counters.queries} answers of this run are cached; raise max_retries/timeout_s "
                               f"or check the server, then run again")

    def _once(self, data: bytes) -> str:
        parts = self._parts
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port, timeout=self.timeout_s)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            connection.request("POST", path, body=data, headers=self._headers())
            response = connection.getresponse()
            raw = response.read()
            status, headers = response.status, response.headers
        except (socket.timeout, TimeoutError):
            raise _Retry(f"timeout: no answer within {self.timeout_s} s") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retry(f"connection: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        text = raw.decode("utf-8", errors="replace")
        if status == 200:
            self.counters.queries += 1
            return text
        message, code = _error_message(text)
        if status == 401 or status == 403:
            named = f"the environment variable {self.token_env}" if self.token_env else "token_env (none is set)"
            raise TeacherHTTPError(f"{self.who}: {self.endpoint} refused the token ({status}: {message or quote(text)}); "
                                   f"check the token in {named}")
        if status == 429 and code in ("insufficient_quota", "budget_exhausted"):
            raise BudgetExhausted(f"{self.who}: the server's quota is spent ({message or quote(text)}); "
                                  f"the run needs at least 1 more query; cached answers are kept", needed=1)
        if status == 429:
            raise _Retry(f"429: {message or 'rate limited'}", _retry_after(headers))
        if status >= 500:
            raise _Retry(f"{status}: {message or quote(text, 80)}", _retry_after(headers))
        raise TeacherHTTPError(f"{self.who}: {self.endpoint} answered {status}: {quote(text)}")


def _error_message(text: str) -> tuple[str, str | None]:
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return "", None
    if isinstance(error, dict):
        return str(error.get("message", ""))[:QUOTE], error.get("code") or error.get("type")
    return (str(error)[:QUOTE], None) if error else ("", None)


def _retry_after(headers: Any) -> float:
    """Seconds the server asked to wait (``retry-after-ms`` first, then ``Retry-After``), capped at a minute."""
    for name, scale in (("retry-after-ms", 1e-3), ("Retry-After", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value:
            try:
                return min(60.0, float(value) * scale)
            except ValueError:
                continue
    return 0.0


def token_from_env(token_env: str | None, who: str = "http_topk") -> str | None:
    if token_env is None:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise TeacherHTTPError(f"{who}: the environment variable {token_env} is not set; export {token_env}=<token> "
                               f"(the token is read from the environment only, never from the spec)")
    return token
