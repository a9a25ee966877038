"""A black-box teacher behind HTTP that answers only the top-k log-probabilities of each next token.

The setting of distillation from a model served by an API (the sparse top-k form used by, for example, the
OpenAI ``logprobs``/``top_logprobs`` completions interface and by offline logit caches such as DistillKit's);
the loss is :mod:`sparse_topk_kd` (top-k plus the remaining mass; Hinton, Vinyals & Dean, "Distilling the
Knowledge in a Neural Network", NIPS Deep Learning Workshop 2015, over a coarsened distribution). Use it only
with models you own or are licensed to distill.

Two wire schemas (:mod:`potstill.serve` serves both, ``potstill serve-teacher``):

- ``schema: potstill`` — ``POST {url}/v1/topk`` with the whole batch, ``{"input_ids", "attention_mask", "k"}``,
  answered by ``indices``/``logprobs`` of shape ``[B][T][k]`` (position ``t`` scores token ``t + 1``).
- ``schema: openai`` — ``POST {url}/v1/completions`` with ``prompt`` = each row's real (unpadded) token ids,
  ``echo: true``, ``logprobs: k``, ``temperature: 0`` and ``max_tokens: 1``: OpenAI's echo entry ``i`` scores
  prompt token ``i`` given the ones before it (entry 0 is null), so entries ``1..n`` give positions
  ``0..n-1``; entry ``n``, the distribution after the whole prompt, only exists with one generated token,
  which is why 1 is asked rather than 0. ``top_logprobs`` keys are token strings, mapped back to ids with
  ``tokenizer`` (its ``convert_ids_to_tokens`` strings) or, for byte-level teachers, the ``bytes:\\xNN``
  convention of :func:`potstill.serve.token_strings`. Padded positions repeat the row's last real position
  (the losses mask them). This is the legacy completions scoring interface (``echo`` with ``logprobs``) as
  OpenAI-compatible servers implement it; hosted APIs may cap ``logprobs`` (OpenAI's at 5) or refuse ``echo``
  for newer models, and such refusals surface as the endpoint's 400 answer, quoted.

``topk(batch, k)`` returns ``(indices, logprobs)`` ``[B, T, k]`` for :mod:`sparse_topk_kd`; called like a model
(``forward``), the teacher returns dense logits rebuilt from the top k: the k log-probabilities, and the
remaining mass ``1 − Σ p_topk`` spread evenly over the other ``V − k`` ids (floored at 1e-20), so the report can
evaluate a student against it. ``k`` is what the endpoint is asked for; a loss may use any k' ≤ k.

Robustness: every answer is cached on disk (``cache``, default ``$POTSTILL_CACHE/http_topk``, else
``~/.cache/potstill/http_topk``) as one file per SHA-256 of (endpoint, request body), written atomically, and
read before any request, so a crash or a rerun never asks the same query twice. ``budget`` caps the queries
(requests answered by the server, retries of failed ones not counted) one run may make; when it is spent the
run stops with a one-line error, its cache intact, saying it needs at least one more query — the current
batch's (the teacher sees one request at a time; each further uncached batch needs one more). For a caller that
knows the batches still to come, ``uncached_queries(batches)`` counts, without sending anything, the distinct
uncached queries they would cost, and ``BudgetExhausted.with_remaining`` restates the error with that figure.
A server's own spent quota (429 ``insufficient_quota``) stops the run the same way. ``rate_limit`` spaces requests at
least ``1/rate_limit`` s apart. 429 and 5xx answers, dropped connections and timeouts (``timeout_s``) are
retried up to ``max_retries`` times with exponential backoff (``backoff_s · 2^attempt``, capped at
``max_backoff_s``, half of it random jitter; at least the server's ``Retry-After``). 401/403 stop the run
naming ``token_env``. Malformed answers (not JSON, wrong shapes, ids outside the vocabulary, log-probabilities
that are not probabilities, unknown token strings) are rejected with the answer quoted (truncated), and are
not cached.

The bearer token is read from the environment variable ``token_env`` when the teacher loads; it is never part
of the spec, the cache, the report, the bundle or an error message. ``LoadedModel.details`` (the report's
"## Teacher") counts queries made, cache hits, retries and retried failures by kind.

YAML:  {name: http_topk, url: "http://127.0.0.1:8765", k: 20, schema: potstill, token_env: POTSTILL_TEACHER_TOKEN, budget: 10000, rate_limit: 20, timeout_s: 30, max_retries: 6, cache: null, tokenizer: null}
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from potstill.hookspecs import hookimpl
from potstill.plugins.teachers._http_client import CachedClient, TeacherHTTPError, quote, token_from_env
from potstill.techniques import Context, ExternalOutput, ExternalTeacher, LoadedModel, Options, Teacher

#: the byte-level vocabulary (``causal_lm`` without a tokenizer)
BYTE_VOCAB = 256


def default_cache() -> Path:
    return Path(os.environ.get("POTSTILL_CACHE", Path.home() / ".cache" / "potstill")) / "http_topk"


class HTTPTopKModel(ExternalTeacher):
    """The endpoint as a model: ``topk(batch, k)`` and dense logits rebuilt from the top k."""

    def __init__(self, client: CachedClient, schema: str, k: int, vocab_size: int | None, tokenizer: Any,
                 model_name: str | None, details: dict[str, Any]):
        super().__init__()
        self.client, self.schema, self.k, self.vocab_size = client, schema, k, vocab_size
        self.tokenizer, self.model_name, self.details = tokenizer, model_name, details
        self._ids: dict[str, int] | None = None

    def __deepcopy__(self, memo: dict) -> "HTTPTopKModel":
        return self  # holds a connection policy and counters, not weights

    # ------------------------------------------------------------------ requests
    def topk(self, batch: dict[str, Tensor], k: int) -> tuple[Tensor, Tensor]:
        if k > self.k:
            raise ValueError(f"http_topk: a loss asks for the top {k}, but the teacher asks the endpoint for k={self.k}; "
                             f"set the teacher's k to at least {k} or the loss's k to at most {self.k}")
        if "input_ids" not in batch:
            raise ValueError("http_topk: serves token-level tasks (causal_lm): the batch has no input_ids")
        ids = batch["input_ids"].long()
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.long()
        try:
            indices, logprobs = (self._potstill(ids, mask) if self.schema == "potstill" else self._openai(ids, mask))
        finally:
            self._update_details()
        return indices[..., :k], logprobs[..., :k]

    def _update_details(self) -> None:
        c = self.client.counters
        self.details.update({"queries": c.queries, "cache_hits": c.cache_hits, "retries": c.retries,
                             "failures": dict(c.failures)})

    def _check_vocab(self, vocab: int, text: str) -> None:
        if self.vocab_size is None:
            self.vocab_size = vocab
        elif vocab != self.vocab_size:
            raise TeacherHTTPError(f"http_topk: the endpoint's vocabulary has {vocab} ids, the teacher expects "
                                   f"{self.vocab_size} (set vocab_size or tokenizer); response: {quote(text)}")

    def request_body(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """The JSON body this batch is asked with (its cache key is the endpoint and this body)."""
        ids = batch["input_ids"].long()
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.long()
        if self.schema == "potstill":
            return {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "k": self.k}
        return {"model": self.model_name or "potstill-teacher", "prompt": _prompts(ids, mask), "max_tokens": 1,
                "echo": True, "logprobs": self.k, "temperature": 0}

    def uncached_queries(self, batches: list[dict[str, Tensor]]) -> int:
        """How many queries these batches would cost: the distinct ones not in the cache (nothing is sent)."""
        return len({self.client.key(body) for body in map(self.request_body, batches) if not self.client.cached(body)})

    def _potstill(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        body = self.request_body({"input_ids": ids, "attention_mask": mask})
        shape = (*ids.shape, self.k)

        def validate(answer: Any, text: str) -> tuple[Tensor, Tensor]:
            def bad(why: str) -> TeacherHTTPError:
                return TeacherHTTPError(f"http_topk: malformed response from {self.client.endpoint} ({why}): {quote(text)}")

            if not isinstance(answer, dict) or "indices" not in answer or "logprobs" not in answer:
                raise bad("expected a JSON object with `indices` and `logprobs`")
            try:
                indices = torch.tensor(answer["indices"], dtype=torch.long)
                logprobs = torch.tensor(answer["logprobs"], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise bad("`indices`/`logprobs` are not rectangular lists of numbers") from None
            if tuple(indices.shape) != shape or tuple(logprobs.shape) != shape:
                raise bad(f"expected `indices` and `logprobs` of shape {list(shape)}, got "
                          f"{list(indices.shape)} and {list(logprobs.shape)}")
            vocab = answer.get("vocab_size", self.vocab_size or BYTE_VOCAB)
            if not isinstance(vocab, int) or vocab < self.k:
                raise bad(f"`vocab_size` must be an integer ≥ k, got {vocab!r}")
            self._check_vocab(vocab, text)
            return self._checked(indices, logprobs, bad)

        return self.client.get(body, validate, describe=f"the current batch of {ids.shape[0]}×{ids.shape[1]} tokens")

    def _checked(self, indices: Tensor, logprobs: Tensor, bad: Any) -> tuple[Tensor, Tensor]:
        vocab = self.vocab_size or BYTE_VOCAB
        if int(indices.min()) < 0 or int(indices.max()) >= vocab:
            raise bad(f"token ids outside [0, {vocab})")
        if not torch.isfinite(logprobs).all() or float(logprobs.max()) > 1e-4:
            raise bad("log-probabilities must be finite and ≤ 0")
        if float(logprobs.logsumexp(-1).max()) > math.log1p(1e-3):
            raise bad("the top-k probabilities sum to more than 1")
        return indices, logprobs

    def _openai(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        body = self.request_body({"input_ids": ids, "attention_mask": mask})
        rows = body["prompt"]
        batch, width = ids.shape

        def validate(answer: Any, text: str) -> tuple[Tensor, Tensor]:
            def bad(why: str) -> TeacherHTTPError:
                return TeacherHTTPError(f"http_topk: malformed response from {self.client.endpoint} ({why}): {quote(text)}")

            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != batch:
                raise bad(f"expected `choices` with one entry per prompt ({batch})")
            try:
                choices = sorted(choices, key=lambda c: c.get("index", 0))
            except (AttributeError, TypeError):
                raise bad("each choice must be an object with an `index`") from None
            ids_of = self._token_ids()
            indices = torch.zeros(batch, width, self.k, dtype=torch.long)
            logprobs = torch.zeros(batch, width, self.k)
            for b, (choice, row) in enumerate(zip(choices, rows)):
                top = (choice.get("logprobs") or {}).get("top_logprobs") if isinstance(choice, dict) else None
                n = len(row)
                if not isinstance(top, list) or len(top) < n + 1:
                    raise bad(f"choice {b}: expected `logprobs.top_logprobs` with {n + 1} entries (echo of {n} prompt "
                              f"tokens and 1 generated)")
                for t in range(n):
                    entry = top[t + 1]
                    if not isinstance(entry, dict) or len(entry) < self.k:
                        raise bad(f"choice {b}, entry {t + 1}: expected a mapping of at least {self.k} tokens to log-probabilities")
                    try:
                        items = sorted(((float(v), s) for s, v in entry.items()), key=lambda item: -item[0])[: self.k]
                    except (TypeError, ValueError):
                        raise bad(f"choice {b}, entry {t + 1}: log-probabilities must be numbers") from None
                    for j, (value, string) in enumerate(items):
                        if string not in ids_of:
                            raise bad(f"choice {b}: unknown token string {string!r}")
                        indices[b, t, j] = ids_of[string]
                        logprobs[b, t, j] = value
                if n < width:  # padding: repeat the last real position (masked by the losses)
                    indices[b, n:] = indices[b, n - 1]
                    logprobs[b, n:] = logprobs[b, n - 1]
            return self._checked(indices, logprobs, bad)

        return self.client.get(body, validate, describe=f"the current batch of {batch} prompts")

    def _token_ids(self) -> dict[str, int]:
        if self._ids is None:
            from potstill.serve import token_ids

            vocab = self.vocab_size or (len(self.tokenizer) if self.tokenizer is not None else BYTE_VOCAB)
            self.vocab_size = vocab
            self._ids = token_ids(self.tokenizer, vocab)
        return self._ids

    # ------------------------------------------------------------------ dense view
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False,
                **_: Any) -> ExternalOutput:
        batch = {"input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        indices, logprobs = self.topk(batch, self.k)
        return ExternalOutput(logits=dense_logits(indices, logprobs, self.vocab_size or BYTE_VOCAB))


def _prompts(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """Each row's real (unpadded) token ids."""
    rows = []
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        real = [t for t, m in zip(row, row_mask) if m]
        rows.append(real or row[:1])
    return rows


def dense_logits(indices: Tensor, logprobs: Tensor, vocab: int) -> Tensor:
    """Log-probabilities ``[..., V]``: the top k as given, the remaining mass spread evenly over the other ids."""
    k = indices.shape[-1]
    rest = (1.0 - logprobs.double().exp().sum(-1, keepdim=True)).clamp(min=1e-20)
    fill = (rest / max(1, vocab - k)).log().float()
    logits = fill.expand(*indices.shape[:-1], vocab).clone()
    return logits.scatter(-1, indices, logprobs.float())


# the option is called `schema` (public interface); it shadows pydantic's deprecated BaseModel.schema, which
# potstill never calls: silence the warning pydantic gives when the class is made
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "schema"')

    class HTTPTopKOptions(Options):
        """Options of the ``http_topk`` teacher."""

        url: str = Field(description="the endpoint's base URL (…/v1/topk or …/v1/completions is appended)")
        k: int = Field(20, ge=1, description="top-k log-probabilities asked per position")
        schema: Literal["potstill", "openai"] = Field("potstill", description="potstill (/v1/topk) or openai (/v1/completions)")
        token_env: str | None = Field("POTSTILL_TEACHER_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                      description="environment variable holding the bearer token (null: none)")
        budget: int | None = Field(None, ge=0, description="most queries (answered requests) this run may make")
        rate_limit: float | None = Field(None, gt=0, description="most requests per second")
        timeout_s: float = Field(30.0, gt=0, description="seconds to wait for one answer")
        max_retries: int = Field(6, ge=0, description="retries of a request after 429/5xx/dropped connections/timeouts")
        backoff_s: float = Field(0.5, gt=0, description="first retry's delay; doubles each retry")
        max_backoff_s: float = Field(30.0, gt=0, description="longest delay between retries")
        cache: str | None = Field(None, description="folder of cached answers (default $POTSTILL_CACHE/http_topk)")
        tokenizer: str | None = Field(None, description="folder of the teacher's tokenizer (null: byte-level)")
        vocab_size: int | None = Field(None, ge=1, description="the teacher's vocabulary size (default: from the "
                                                                "answers, the tokenizer, or 256)")
        model: str | None = Field(None, description="model name sent in OpenAI requests")

        @field_validator("url")
        @classmethod
        def _url(cls, value: str) -> str:
            if not value.startswith(("http://", "https://")):
                raise ValueError(f"url must start with http:// or https:// (got {value!r})")
            if "@" in value.split("/")[2]:
                raise ValueError("url must not hold credentials; put the token in the environment variable token_env")
            return value.rstrip("/")

        @field_validator("cache", "tokenizer")
        @classmethod
        def _folder(cls, value: str | None, info: ValidationInfo) -> str | None:
            if value is None:
                return None
            base = Path((info.context or {}).get("base_dir", "."))
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if info.field_name == "tokenizer" and not path.is_dir():
                raise ValueError(f"tokenizer folder not found: {path}")
            return str(path.resolve())


class HTTPTopKTeacher(Teacher):
    name = "http_topk"
    local_weights = False
    conformance_world = "causal_lm"

    Options = HTTPTopKOptions

    def endpoint(self) -> str:
        url = self.options.url
        path = "/v1/topk" if self.options.schema == "potstill" else "/v1/completions"
        return url if url.endswith(path) else url + path

    def load(self, ctx: Context | None) -> LoadedModel:
        o = self.options
        token = token_from_env(o.token_env)
        cache = Path(o.cache) if o.cache is not None else default_cache()
        client = CachedClient(self.endpoint(), token, cache, budget=o.budget, rate_limit=o.rate_limit,
                              timeout_s=o.timeout_s, max_retries=o.max_retries, backoff_s=o.backoff_s,
                              max_backoff_s=o.max_backoff_s, token_env=o.token_env)
        tokenizer = None
        if o.tokenizer is not None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(o.tokenizer)
        vocab = o.vocab_size or (len(tokenizer) if tokenizer is not None and o.schema == "openai" else None)
        details: dict[str, Any] = {"endpoint": self.endpoint(), "schema": o.schema, "k": o.k, "budget": o.budget,
                                   "cache": str(cache), "queries": 0, "cache_hits": 0, "retries": 0, "failures": {}}
        model = HTTPTopKModel(client, o.schema, o.k, vocab, tokenizer, o.model, details).eval()
        return LoadedModel(model=model, tokenizer=tokenizer, details=details,
                           description=f"top-{o.k} log-probabilities from {self.endpoint()} ({o.schema} schema)")

    def conformance_check(self, model: torch.nn.Module, context: Any) -> None:
        """The conformance suite's check (a teacher that needs a live endpoint brings one up): serve ``model``
        with :class:`potstill.serve.TeacherServer` on 127.0.0.1, point these options at it (token in a scratch
        environment variable, cache in a scratch folder), and check that the top k and the dense logits are the
        model's."""
        import secrets
        import tempfile

        from potstill.serve import TeacherServer

        ctx = context(model)
        batch = ctx.task.collate(ctx.data.heldout[:3], None)
        token, variable = secrets.token_hex(8), "POTSTILL_CONFORMANCE_TOKEN"
        previous = os.environ.get(variable)
        os.environ[variable] = token
        try:
            with TeacherServer(LoadedModel(model=model), ctx.task, token=token) as server, \
                    tempfile.TemporaryDirectory() as cache:
                options = self.options.model_copy(update={"url": server.url, "token_env": variable, "cache": cache,
                                                          "budget": None, "rate_limit": None, "tokenizer": None})
                loaded = type(self)(options).load(ctx)
                with torch.no_grad():
                    served = ctx.task.forward(loaded.model, batch).logits
                    local = torch.log_softmax(ctx.task.forward(model, batch).logits.float(), -1)
                indices, logprobs = loaded.model.topk(batch, options.k)
        finally:
            if previous is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = previous
        real = batch["attention_mask"].bool()
        assert served.shape == local.shape and torch.isfinite(served).all()
        assert torch.allclose(logprobs[real], local.topk(options.k, -1).values[real], atol=1e-4)
        assert torch.allclose(served.gather(-1, indices)[real], logprobs[real])
        assert loaded.details["queries"] >= 1 and token not in repr(loaded.details)


@hookimpl
def register_teachers(register):
    register(HTTPTopKTeacher)
