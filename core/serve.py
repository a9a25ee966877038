"""Serve a local teacher as a black-box top-k log-probability endpoint over HTTP (``potstill serve-teacher``).

A real HTTP server (the standard library's ``ThreadingHTTPServer``), meant for loopback, so that the black-box
teacher path (:mod:`potstill.plugins.teachers.http_topk`) can be tested and used end to end, and so that a
teacher can be shared by several runs without each holding it in memory.

Endpoints (all but ``GET /health`` need ``Authorization: Bearer <token>`` when the server has a token):

``POST /v1/topk`` — potstill's own schema. Request ``{"input_ids": [[...], ...], "attention_mask": [[...], ...]
(optional, default all ones; ragged rows are right-padded with 0 and masked), "k": 20}``. Answer ``{"object":
"topk", "model": ..., "vocab_size": V, "k": k, "indices": [B][T][k], "logprobs": [B][T][k]}``: at position ``t``
the k most probable ids for token ``t + 1`` and their natural-log probabilities, normalised over the whole
vocabulary (the task's logits at ``t``, log-softmaxed in float32), most probable first; padded positions are
answered too (their values are the model's and mean nothing).

``POST /v1/completions`` — OpenAI-compatible legacy completions used for scoring: ``{"model": ..., "prompt":
[[ids...], ...] (token ids; a string or a list of strings is tokenized), "max_tokens": 0 or 1, "echo": true,
"logprobs": k}``. One choice per prompt, with ``logprobs.tokens``, ``token_logprobs``, ``top_logprobs`` and
``text_offset`` as OpenAI's API gives them with ``echo``: entry ``i`` scores prompt token ``i`` given the
tokens before it, so entry 0 is ``null``; with ``max_tokens: 1`` one greedy token is appended whose
``top_logprobs`` is the distribution after the whole prompt (this server scores, it does not sample; larger
``max_tokens`` are refused). Token strings: the tokenizer's own token strings (``convert_ids_to_tokens``)
when the teacher has a tokenizer; for byte-level models (no tokenizer; token ``i`` is byte ``i``) printable
ASCII bytes (32–126) are the character itself and every other byte is ``bytes:\\xNN`` (two lowercase hex
digits), the convention of OpenAI's ``bytes:`` tokens. :func:`token_strings` / :func:`token_ids` map both ways.

``GET /v1/stats`` (counters, below), ``GET /v1/models``, ``GET /health``.

Errors are JSON ``{"error": {"message", "type", "code"}}``: 401 for a missing or wrong token; 400 for a malformed
request; 429 ``rate_limit_exceeded`` with ``Retry-After`` (whole seconds) and ``retry-after-ms`` headers when
requests come faster than ``rate_limit`` per second (a token bucket holding ``max(1, rate_limit)`` requests);
429 ``insufficient_quota`` (OpenAI's code for a spent quota: clients must not retry it) once ``budget``
requests have been answered. ``fail_every=n`` makes every n-th scoring request fail before it is computed,
alternately with a 500 and with a dropped connection (the socket closed without an answer), to test clients.

Counters: ``stats`` (requests, answered, undelivered, unauthorized, rate_limited, over_budget, injected_failures,
bad_requests) and ``answered_keys``, a ``Counter`` of the SHA-256 of each answered request (path + body); with
``ledger`` each answered key is also appended to a file, one line per answer, so that answers are counted across
restarts of the server. An answer is counted when it is computed, before it is sent (as an API bills it);
``undelivered`` counts those whose connection broke while sending. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TeacherServer", "token_strings", "token_ids", "byte_token", "request_key"]

#: byte-level token strings: printable ASCII as itself, everything else as ``bytes:\xNN``
BYTE_VOCAB = 256


def byte_token(i: int) -> str:
    return chr(i) if 32 <= i < 127 else f"bytes:\\x{i:02x}"


def token_strings(tokenizer: Any, vocab_size: int) -> list[str]:
    """The string of each token id, as the OpenAI endpoint writes them (see the module docstring)."""
    if tokenizer is None:
        return [byte_token(i) if i < BYTE_VOCAB else f"id:{i}" for i in range(vocab_size)]
    strings = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    return [s if s is not None else f"id:{i}" for i, s in enumerate(strings)]


def token_ids(tokenizer: Any, vocab_size: int) -> dict[str, int]:
    """The inverse of :func:`token_strings`."""
    return {s: i for i, s in enumerate(token_strings(tokenizer, vocab_size))}


def request_key(path: str, body: bytes) -> str:
    """The identity of a request: SHA-256 of its path and body (the server's ledger and counters use it)."""
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


class _RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}


class _Drop(Exception):
    """Close the connection without answering."""


class TeacherServer:
    """A local teacher behind ``POST /v1/topk`` and ``POST /v1/completions`` on ``host:port``.

    ``with TeacherServer(loaded_model, task, token="t", port=0) as server: server.url`` — ``loaded_model`` is a
    :class:`~potstill.techniques.LoadedModel` (or a bare module), ``task`` a task technique or its name (the
    task's ``forward`` must produce ``logits`` from ``input_ids``/``attention_mask``; ``causal_lm`` does),
    ``port=0`` picks a free port, ``budget`` caps the answered requests, ``rate_limit`` the requests per second,
    ``fail_every`` injects failures (see the module docstring).
    """

    def __init__(self, loaded_model: Any, task: Any = "causal_lm", token: str | None = "t", port: int = 0,
                 budget: int | None = None, rate_limit: float | None = None, fail_every: int = 0,
                 host: str = "127.0.0.1", ledger: str | Path | None = None, model_name: str = "potstill-teacher",
                 max_k: int | None = None):
        if budget is not None and budget < 0:
            raise ValueError(f"serve-teacher: budget must be 0 or more (got {budget})")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError(f"serve-teacher: rate_limit must be positive requests per second (got {rate_limit})")
        if fail_every < 0:
            raise ValueError(f"serve-teacher: fail_every must be 0 (never) or more (got {fail_every})")
        self.model = getattr(loaded_model, "model", loaded_model)
        self.tokenizer = getattr(loaded_model, "tokenizer", None)
        if isinstance(task, str):
            from potstill.spec import nested_technique

            task = nested_technique("task", {"name": task})
        self.task = task
        self.token, self.budget, self.rate_limit, self.fail_every = token, budget, rate_limit, fail_every
        self.host, self.port, self.model_name, self.max_k = host, port, model_name, max_k
        self.ledger = Path(ledger) if ledger is not None else None
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "answered", "undelivered", "unauthorized", "rate_limited", "over_budget", "injected_failures",
             "bad_requests"), 0)
        self.answered_keys: Counter[str] = Counter()
        self._lock = threading.Lock()  # counters and the rate limiter
        self._compute = threading.Lock()  # one forward at a time: deterministic, and torch's threads are not shared
        self._scoring = 0  # scoring requests seen (for fail_every)
        self._bucket = max(1.0, rate_limit or 1.0)
        self._bucket_time = time.monotonic()
        self._strings: list[str] | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def check(self) -> None:
        """Fail at start, not at the first request, when the task gives no per-token logits for token ids."""
        ids = torch.ones(1, 2, dtype=torch.long)
        try:
            self.log_softmax(ids, torch.ones_like(ids))
        except Exception as exc:  # noqa: BLE001 - any failure here means the model and task do not fit
            raise ValueError(f"serve-teacher: task {getattr(self.task, 'name', self.task)!r} gives no per-token logits "
                             f"from input_ids for this model ({type(exc).__name__}: {exc}); serve a language model "
                             f"with --task causal_lm") from None

    def start(self) -> "TeacherServer":
        self.check()
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"potstill-teacher-{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the CLI)."""
        self.check()
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd.server_close()

    def close(self) -> None:
        """Stop listening (requests in flight are cut off, like a killed server's)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ policy
    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token.encode())

    def admit(self) -> None:
        """Injected failures, the rate limit and the budget, in that order; raise to refuse."""
        with self._lock:
            self._scoring += 1
            if self.fail_every and self._scoring % self.fail_every == 0:
                self.stats["injected_failures"] += 1
                if self.stats["injected_failures"] % 2 == 1:
                    raise _RequestError(500, "injected failure (fail_every)", "server_error", "injected_failure")
                raise _Drop()
            if self.rate_limit is not None:
                now = time.monotonic()
                capacity = max(1.0, self.rate_limit)
                self._bucket = min(capacity, self._bucket + (now - self._bucket_time) * self.rate_limit)
                self._bucket_time = now
                if self._bucket < 1.0:
                    wait = (1.0 - self._bucket) / self.rate_limit
                    self.stats["rate_limited"] += 1
                    raise _RequestError(429, f"rate limit of {self.rate_limit:g} requests/s exceeded; retry after "
                                             f"{wait:.3f} s", "rate_limit_exceeded", "rate_limit_exceeded",
                                        {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000))})
                self._bucket -= 1.0
            if self.budget is not None and self.stats["answered"] >= self.budget:
                self.stats["over_budget"] += 1
                raise _RequestError(429, f"query budget of {self.budget} requests is spent; this server answers no more",
                                    "insufficient_quota", "insufficient_quota")

    def record_answer(self, key: str) -> None:
        with self._lock:
            self.stats["answered"] += 1
            self.answered_keys[key] += 1
            if self.ledger is not None:
                with open(self.ledger, "a", encoding="utf-8") as handle:
                    handle.write(key + "\n")

    # ------------------------------------------------------------------ scoring
    def log_softmax(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._compute, torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            try:
                out = self.task.forward(self.model, {"input_ids": input_ids, "attention_mask": attention_mask})
            finally:
                self.model.train(was_training)
            logits = out.logits if hasattr(out, "logits") else out
            if logits is None or logits.dim() != 3:
                raise _RequestError(500, f"the task {getattr(self.task, 'name', '?')} gives no per-token logits", "server_error")
            return F.log_softmax(logits.float(), dim=-1)

    def _k(self, value: Any, vocab: int) -> int:
        limit = min(vocab, self.max_k or vocab)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise _RequestError(400, f"k/logprobs must be an integer from 1 to {limit} (got {value!r})")
        return value

    def strings(self, vocab: int) -> list[str]:
        if self._strings is None or len(self._strings) != vocab:
            self._strings = token_strings(self.tokenizer, vocab)
        return self._strings

    def vocab_size(self) -> int:
        config = getattr(self.model, "config", None)
        return int(getattr(config, "vocab_size", 0) or BYTE_VOCAB)

    def answer_topk(self, body: dict[str, Any]) -> dict[str, Any]:
        rows = body.get("input_ids")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
            raise _RequestError(400, "input_ids must be a non-empty list of non-empty lists of token ids")
        masks = body.get("attention_mask")
        if masks is not None and (not isinstance(masks, list) or len(masks) != len(rows)
                                  or any(not isinstance(m, list) or len(m) != len(r) for m, r in zip(masks, rows))):
            raise _RequestError(400, "attention_mask must have input_ids' shape")
        ids, mask = _pad(rows, masks, self.vocab_size())
        logp = self.log_softmax(ids, mask)
        k = self._k(body.get("k", 20), logp.shape[-1])
        values, indices = logp.topk(k, dim=-1)
        answer = {"object": "topk", "model": self.model_name, "vocab_size": logp.shape[-1], "k": k}
        if masks is None and len({len(r) for r in rows}) > 1:  # ragged rows: answer each row's own length
            lengths = [len(r) for r in rows]
            answer["indices"] = [indices[i, :n].tolist() for i, n in enumerate(lengths)]
            answer["logprobs"] = [values[i, :n].tolist() for i, n in enumerate(lengths)]
        else:
            answer["indices"], answer["logprobs"] = indices.tolist(), values.tolist()
        return answer

    def answer_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts = self._prompts(body.get("prompt"))
        max_tokens = body.get("max_tokens", 16)
        if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
            raise _RequestError(400, f"this server scores prompts: max_tokens must be 0 or 1 (got {max_tokens!r})")
        echo = bool(body.get("echo", False))
        k = body.get("logprobs")
        choices = []
        prompt_tokens = 0
        for index, row in enumerate(prompts):
            ids = torch.tensor([row], dtype=torch.long)
            logp = self.log_softmax(ids, torch.ones_like(ids))[0]  # [T, V]: row t predicts token t + 1
            vocab = logp.shape[-1]
            k_row = None if k is None else self._k(k, vocab)
            strings = self.strings(vocab)
            tokens, token_lp, top = [], [], []
            if echo:
                for t, token in enumerate(row):
                    tokens.append(strings[token])
                    token_lp.append(None if t == 0 else float(logp[t - 1, token]))
                    top.append(None if t == 0 or k_row is None else _top(logp[t - 1], k_row, strings))
            if max_tokens == 1:
                new = int(logp[-1].argmax())
                tokens.append(strings[new])
                token_lp.append(float(logp[-1, new]))
                top.append(None if k_row is None else _top(logp[-1], k_row, strings))
            text_pieces = tokens
            offsets, position = [], 0
            for piece in text_pieces:
                offsets.append(position)
                position += len(piece)
            choice = {"index": index, "text": "".join(text_pieces), "finish_reason": "length"}
            choice["logprobs"] = ({"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top,
                                   "text_offset": offsets} if k is not None else None)
            choices.append(choice)
            prompt_tokens += len(row)
        return {"id": "cmpl-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24],
                "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens * len(prompts),
                          "total_tokens": prompt_tokens + max_tokens * len(prompts)}}

    def _prompts(self, prompt: Any) -> list[list[int]]:
        vocab = self.vocab_size()
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise _RequestError(400, "prompt must be token ids, a list of token-id lists, a string or a list of strings")
        rows = []
        for item in prompt:
            if isinstance(item, str):
                item = (self.tokenizer(item, add_special_tokens=False)["input_ids"] if self.tokenizer is not None
                        else list(item.encode("utf-8")))
            if (not isinstance(item, list) or not item
                    or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in item)):
                raise _RequestError(400, f"each prompt must be a non-empty list of token ids in [0, {vocab})")
            rows.append(item)
        return rows


def _top(logp_row: torch.Tensor, k: int, strings: list[str]) -> dict[str, float]:
    values, indices = logp_row.topk(k)
    return {strings[int(i)]: float(v) for v, i in zip(values, indices)}


def _pad(rows: list[list[Any]], masks: list[list[Any]] | None, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in row):
            raise _RequestError(400, f"input_ids must be integers in [0, {vocab}) (row {i})")
        ids[i, : len(row)] = torch.tensor(row)
        if masks is None:
            mask[i, : len(row)] = 1
        else:
            if not all(m in (0, 1) for m in masks[i]):
                raise _RequestError(400, f"attention_mask must hold 0s and 1s (row {i})")
            mask[i, : len(row)] = torch.tensor(masks[i])
    return ids, mask


def _make_handler(server: TeacherServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "potstill-teacher"
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet; never logs headers
            pass

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> bool:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                return True
            except (BrokenPipeError, ConnectionResetError, OSError):
                return False

        def _error(self, error: _RequestError) -> None:
            self._send(error.status, {"error": {"message": error.message, "type": error.kind, "code": error.code}},
                       error.headers)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._send(200, {"ok": True})
                return
            if not server.authorized(self.headers.get("Authorization")):
                server._count("unauthorized")
                self._error(_RequestError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                                          "invalid_request_error", "invalid_api_key"))
                return
            if self.path == "/v1/stats":
                with server._lock:
                    self._send(200, {**server.stats, "distinct_answered": len(server.answered_keys)})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "potstill"}]})
            else:
                self._error(_RequestError(404, f"no such endpoint: GET {self.path}", code="not_found"))

        def do_POST(self) -> None:  # noqa: N802
            server._count("requests")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length > 0 else b""
            except (ValueError, OSError):
                self._error(_RequestError(400, "unreadable request body"))
                return
            if not server.authorized(self.headers.get("Authorization")):
                server._count("unauthorized")
                self._error(_RequestError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                                          "invalid_request_error", "invalid_api_key"))
                return
            if self.path not in ("/v1/topk", "/v1/completions"):
                self._error(_RequestError(404, f"no such endpoint: POST {self.path} (use /v1/topk or /v1/completions)",
                                          code="not_found"))
                return
            try:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise _RequestError(400, f"the body is not JSON ({exc})") from None
                if not isinstance(body, dict):
                    raise _RequestError(400, "the body must be a JSON object")
                server.admit()
                answer = server.answer_topk(body) if self.path == "/v1/topk" else server.answer_completions(body)
            except _Drop:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            except _RequestError as error:
                if error.status == 400:
                    server._count("bad_requests")
                self._error(error)
                return
            except Exception as exc:  # noqa: BLE001 - a bug in the model answers 500, the server keeps running
                self._error(_RequestError(500, f"{type(exc).__name__}: {exc}", "server_error"))
                return
            # counted (billed) before it is sent, as an API bills: a client that reads the answer sees it counted
            server.record_answer(request_key(self.path, raw))
            if not self._send(200, answer):
                server._count("undelivered")

    return Handler
