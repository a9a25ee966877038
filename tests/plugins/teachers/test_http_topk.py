"""The black-box ``http_topk`` teacher, end to end against ``potstill serve-teacher`` on 127.0.0.1.

Distilling through a server that fails every n-th request, or that is killed and restarted mid-run, ends with
exactly the student a healthy server gives, and no answered query is asked twice (the server's ledger); a
rerun pays nothing (the disk cache); a bad token, a spent budget and malformed answers stop the run with one
clear line, the cache intact; the token reaches no file of the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import potstill
from potstill.plugins.teachers._http_client import BudgetExhausted, TeacherHTTPError
from potstill.plugins.teachers.http_topk import HTTPTopKTeacher, dense_logits
from potstill.serve import TeacherServer
from potstill.techniques import LoadedModel

TOKEN = "tok-3f9a1c7e5d"  # what the tests send; it must appear in no file of a run
K = 8


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    # a random byte-level GPT-2 (vocabulary 256: the causal_lm task's bytes) whose output head is scaled up, so
    # that its next-byte distributions are peaked like a trained model's rather than nearly uniform
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(60)
    folder = tmp_path_factory.mktemp("http_teacher")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from transformers import GPT2LMHeadModel

    return LoadedModel(model=GPT2LMHeadModel.from_pretrained(teacher_dir).eval())


@pytest.fixture(scope="module", autouse=True)
def token_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HTTP_TOPK_TEST_TOKEN", TOKEN)
        yield


def _spec(teacher_dir, url, cache, **teacher):
    return {"potstill": 1, "name": "http", "seed": 0, "task": {"name": "causal_lm", "max_length": 32},
            "data": {"name": "cpython_source", "length": 32, "heldout": 8, "max_examples": 64},
            "teacher": {"name": "http_topk", "url": url, "k": K, "token_env": "HTTP_TOPK_TEST_TOKEN",
                        "cache": str(cache), "backoff_s": 0.01, "max_backoff_s": 0.5, **teacher},
            "stages": [{"student": {"name": "hf", "path": str(teacher_dir), "reinitialize": True}},
                       {"distill": {"steps": 12, "batch_size": 4, "checkpoint_every": 3, "optimizer": {"lr": 0.02},
                                    "losses": [{"name": "sparse_topk_kd", "k": K}]}}],
            "measure": {"repeats": 1, "warmup": 0, "heldout_batches": 1, "batch_size": 2, "seq_len": 16}}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "stages" / "1-distill" / "state.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _no_token_in(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"the token leaked into {path}"


@pytest.fixture(scope="module")
def healthy(teacher, teacher_dir, tmp_path_factory):
    """One run through a healthy server: the reference weights, and what the server answered."""
    root = tmp_path_factory.mktemp("healthy")
    with TeacherServer(teacher, "causal_lm", token=TOKEN) as server:
        report = potstill.run(_spec(teacher_dir, server.url, root / "cache"), out=root / "out", progress=False)
        answered = Counter(server.answered_keys)
        # a rerun in a fresh folder, same cache: every answer comes from disk, nothing is asked again
        again = potstill.run(_spec(teacher_dir, server.url, root / "cache"), out=root / "again", progress=False)
        assert server.answered_keys == answered
    return {"root": root, "report": report, "again": again, "answered": answered, "weights": _weights(root / "out")}


def test_a_healthy_run_distills_and_reports_its_queries(healthy, teacher, teacher_dir):
    details = healthy["report"]["teacher_details"]
    assert details["queries"] == sum(healthy["answered"].values()) > 0 and details["retries"] == 0
    assert max(healthy["answered"].values()) == 1  # no answered query asked twice
    again = healthy["again"]["teacher_details"]
    assert again["queries"] == 0 and again["cache_hits"] >= details["queries"]
    assert _same(_weights(healthy["root"] / "again"), healthy["weights"])
    _no_token_in(healthy["root"])
    # the direction: distilling from the served top k brought the student closer to the real teacher
    import types

    from potstill.plugins.students.hf import HFStudent
    from potstill.plugins.tasks.causal_lm import CausalLM, next_token_mask
    from potstill.testing import cpython_lines

    task = CausalLM(max_length=32)
    ctx = types.SimpleNamespace(seed=0, task=task)
    before = HFStudent(path=str(teacher_dir), reinitialize=True).build(None, ctx).eval()
    after = HFStudent(path=str(teacher_dir), reinitialize=True).build(None, ctx).eval()
    after.load_state_dict(healthy["weights"])
    batch = task.collate(cpython_lines(32, 16, heldout=True))
    mask = next_token_mask(batch["attention_mask"])

    def kl(student):
        with torch.no_grad():
            t = torch.log_softmax(task.forward(teacher.model, batch).logits, -1)
            s = torch.log_softmax(task.forward(student, batch).logits, -1)
        return float(((t.exp() * (t - s)).sum(-1) * mask).sum() / mask.sum())

    assert kl(after) < 0.8 * kl(before), (kl(before), kl(after))


def test_a_server_failing_every_third_request_gives_the_same_student(healthy, teacher, teacher_dir, tmp_path):
    with TeacherServer(teacher, "causal_lm", token=TOKEN, fail_every=3) as server:
        report = potstill.run(_spec(teacher_dir, server.url, tmp_path / "cache"), out=tmp_path / "out", progress=False)
        assert server.stats["injected_failures"] >= 2  # a 500 and a dropped connection
        assert max(server.answered_keys.values()) == 1
        assert set(server.answered_keys) == set(healthy["answered"])
    details = report["teacher_details"]
    assert details["retries"] == server.stats["injected_failures"]
    assert details["failures"].get("500") and details["failures"].get("connection")
    assert _same(_weights(tmp_path / "out"), healthy["weights"])
    _no_token_in(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cli(teacher_dir: Path, port: int, ledger: Path) -> subprocess.Popen:
    env = {**os.environ, "POTSTILL_TEACHER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "potstill.cli", "serve-teacher", str(teacher_dir), "--port",
                                str(port), "--ledger", str(ledger)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # printed once the socket listens
    assert f"127.0.0.1:{port}" in line, (line, process.stderr.read() if process.poll() is not None else "")
    return process


def test_a_server_killed_and_restarted_mid_run_gives_the_same_student(healthy, teacher_dir, tmp_path, monkeypatch):
    """The CLI server is SIGKILLed after its 3rd answer (just before the client's next request) and restarted on
    the same port (a new process: seconds); the client's retries (up to 40, 0.05 s doubling to 1 s) carry the
    run over the gap. Its ledger (one line per answer, across both processes) has no key twice."""
    from potstill.plugins.teachers._http_client import CachedClient

    port, ledger = _free_port(), tmp_path / "ledger.txt"
    processes = [_start_cli(teacher_dir, port, ledger)]
    killed = threading.Event()
    restart = threading.Thread(target=lambda: processes.append(_start_cli(teacher_dir, port, ledger)), daemon=True)
    send = CachedClient._once

    def once(self, data):
        if not killed.is_set() and ledger.is_file() and len(ledger.read_text().split()) >= 3:
            processes[0].send_signal(signal.SIGKILL)
            processes[0].wait()
            killed.set()
            restart.start()
        return send(self, data)

    monkeypatch.setattr(CachedClient, "_once", once)
    try:
        report = potstill.run(_spec(teacher_dir, f"http://127.0.0.1:{port}", tmp_path / "cache", max_retries=40,
                                    backoff_s=0.05, max_backoff_s=1.0), out=tmp_path / "out", progress=False)
    finally:
        if restart.is_alive():
            restart.join(timeout=60)
        for process in processes:
            process.kill()
            process.wait()
    assert killed.is_set() and len(processes) == 2
    keys = ledger.read_text().split()
    assert Counter(keys).most_common(1)[0][1] == 1, "an answered query was asked again"
    assert set(keys) == set(healthy["answered"])
    assert report["teacher_details"]["failures"].get("connection")  # it did hit the dead server
    assert _same(_weights(tmp_path / "out"), healthy["weights"])
    _no_token_in(tmp_path)


def test_a_bad_token_is_a_clear_401_naming_token_env(teacher, teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HTTP_TOPK_TEST_TOKEN", "wrong-token")
    with TeacherServer(teacher, "causal_lm", token=TOKEN) as server:
        with pytest.raises(TeacherHTTPError, match=r"refused the token \(401.*HTTP_TOPK_TEST_TOKEN") as info:
            potstill.run(_spec(teacher_dir, server.url, tmp_path / "cache"), out=tmp_path / "out", progress=False)
        assert server.stats["unauthorized"] == 1 and server.stats["answered"] == 0  # not retried
    assert "wrong-token" not in str(info.value) and TOKEN not in str(info.value)
    monkeypatch.delenv("HTTP_TOPK_TEST_TOKEN")
    with pytest.raises(TeacherHTTPError, match=r"environment variable HTTP_TOPK_TEST_TOKEN is not set"):
        HTTPTopKTeacher(url="http://127.0.0.1:9", token_env="HTTP_TOPK_TEST_TOKEN").load(None)


def test_a_spent_budget_stops_cleanly_and_the_rerun_pays_only_the_rest(healthy, teacher, teacher_dir, tmp_path):
    needed = sum(healthy["answered"].values())
    with TeacherServer(teacher, "causal_lm", token=TOKEN) as server:
        # the distill loop restates the teacher's "at least 1" with the uncached queries of the steps left
        with pytest.raises(BudgetExhausted, match=r"query budget of 2 spent .*2 answers cached.*the \d+ remaining steps "
                                                  r"of stage 1 still need \d+ uncached quer") as info:
            potstill.run(_spec(teacher_dir, server.url, tmp_path / "cache", budget=2), out=tmp_path / "out", progress=False)
        assert 1 <= info.value.needed <= needed - 2 and "\n" not in str(info.value)
        cached = sorted((tmp_path / "cache").glob("*/*.json"))
        assert len(cached) == 2 and all(json.loads(p.read_text())["indices"] for p in cached)  # intact
        assert not list((tmp_path / "cache").rglob("*.tmp"))
        report = potstill.run(_spec(teacher_dir, server.url, tmp_path / "cache"), out=tmp_path / "out", progress=False)
        assert report["teacher_details"]["queries"] == needed - 2
        assert max(server.answered_keys.values()) == 1 and server.stats["answered"] == needed
    assert _same(_weights(tmp_path / "out"), healthy["weights"])


def test_uncached_queries_counts_what_the_remaining_batches_would_cost(teacher, tmp_path):
    """What the distill loop can tell a user whose budget ran out: the uncached queries of the batches left."""
    batches = [{"input_ids": torch.randint(1, 256, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
               for _ in range(3)]
    with TeacherServer(teacher, "causal_lm", token=TOKEN) as server:
        model = HTTPTopKTeacher(url=server.url, k=K, token_env="HTTP_TOPK_TEST_TOKEN", budget=1,
                                cache=str(tmp_path / "cache")).load(None).model
        assert model.uncached_queries(batches + batches[:1]) == 3 and server.stats["requests"] == 0  # nothing sent
        model.topk(batches[0], K)
        assert model.uncached_queries(batches) == 2
        with pytest.raises(BudgetExhausted) as info:
            model.topk(batches[1], K)
    exact = info.value.with_remaining(model.uncached_queries(batches[1:]), "the 2 remaining steps")
    assert exact.needed == 2 and str(exact).startswith("http_topk: query budget of 1 spent (1 queries this run, 1 answers cached")
    assert "the 2 remaining steps still need 2 uncached queries; raise `budget` and run again" in str(exact)


def test_the_server_budget_stops_the_run_too(teacher, teacher_dir, tmp_path):
    with TeacherServer(teacher, "causal_lm", token=TOKEN, budget=1) as server:
        with pytest.raises(BudgetExhausted, match=r"server's quota is spent \(query budget of 1 requests is spent"):
            potstill.run(_spec(teacher_dir, server.url, tmp_path / "cache"), out=tmp_path / "out", progress=False)
        assert server.stats["over_budget"] == 1  # insufficient_quota is not retried


class _Junk(BaseHTTPRequestHandler):
    body = b""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        except OSError:  # the client gave up (the timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("schema,body,why", [
    ("potstill", b"<html>Service Unavailable</html>" + b"x" * 1000, r"not JSON"),
    ("potstill", json.dumps({"indices": [[[1, 2]]], "logprobs": [[[-1.0, -2.0]]]}).encode(), r"shape \[2, 3, 8\]"),
    ("potstill", json.dumps({"indices": [[[300] * K] * 3] * 2, "logprobs": [[[-9.0] * K] * 3] * 2}).encode(),
     r"token ids outside \[0, 256\)"),
    ("potstill", json.dumps({"indices": [[list(range(K))] * 3] * 2, "logprobs": [[[-0.1] * K] * 3] * 2}).encode(),
     r"sum to more than 1"),
    ("openai", json.dumps({"choices": [{"index": i, "logprobs": {"top_logprobs": [None] + [{"no-such-token": -1.0, **{
        chr(65 + j): -5.0 for j in range(K)}}] * 3}} for i in range(2)]}).encode(), r"unknown token string 'no-such-token'"),
])
def test_malformed_answers_are_rejected_quoted_and_not_cached(schema, body, why, tmp_path):
    handler = type("Handler", (_Junk,), {"body": body})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        teacher = HTTPTopKTeacher(url=f"http://127.0.0.1:{httpd.server_address[1]}", k=K, schema=schema,
                                  token_env="HTTP_TOPK_TEST_TOKEN", cache=str(tmp_path / "cache"), max_retries=0)
        model = teacher.load(None).model
        batch = {"input_ids": torch.randint(1, 256, (2, 3)), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
        with pytest.raises(TeacherHTTPError, match=r"malformed response from http://127\.0\.0\.1:\d+/v1/\w+ \(.*" + why) as info:
            model.topk(batch, K)
        quoted = body.decode()[:40]
        assert repr(quoted)[1:-1][:30] in str(info.value)  # the response is quoted...
        assert len(str(info.value)) < 1000  # ...truncated
        assert not list((tmp_path / "cache").rglob("*.json"))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_openai_schema_gives_the_potstill_schema_answers(teacher, tmp_path):
    ids = torch.randint(1, 256, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with TeacherServer(teacher, "causal_lm", token=TOKEN) as server:
        answers = {}
        for schema in ("potstill", "openai"):
            model = HTTPTopKTeacher(url=server.url, k=K, schema=schema, token_env="HTTP_TOPK_TEST_TOKEN",
                                    cache=str(tmp_path / schema)).load(None).model
            answers[schema] = model.topk(batch, K)
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(input_ids=ids, attention_mask=mask).logits, -1)
    values, _ = logp.topk(K, -1)
    real = mask.bool()
    for schema, (indices, logprobs) in answers.items():
        assert torch.allclose(logprobs[real], values[real], atol=1e-5), schema
        assert torch.allclose(logp.gather(-1, indices)[real], values[real], atol=1e-5), schema  # the right ids
    # padded positions of the openai answer repeat the row's last real one
    assert torch.equal(answers["openai"][0][1, 5], answers["openai"][0][1, 4])


def test_dense_logits_keep_the_top_k_and_spread_the_rest():
    logp = torch.log_softmax(torch.randn(2, 5, 50), -1)
    values, indices = logp.topk(6, -1)
    dense = dense_logits(indices, values, 50)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert torch.equal(dense.gather(-1, indices), values)
    outside = torch.ones_like(dense, dtype=torch.bool).scatter(-1, indices, False)
    expected = ((1 - values.exp().sum(-1, keepdim=True)) / (50 - 6)).log().expand_as(dense)
    assert torch.allclose(dense[outside], expected[outside], atol=1e-5)  # the rest, evenly on every other id


def test_rate_limit_and_timeout(teacher, tmp_path):
    batch = {"input_ids": torch.randint(1, 256, (1, 4)), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    # the server holds a bucket of 10 requests refilled at 10/s: a client asking faster is answered 429 with
    # Retry-After, waits, and gets every answer; one limited to 8/s is never refused
    with TeacherServer(teacher, "causal_lm", token=TOKEN, rate_limit=10) as server:
        fast = HTTPTopKTeacher(url=server.url, k=K, token_env="HTTP_TOPK_TEST_TOKEN", cache=str(tmp_path / "a")).load(None)
        for i in range(20):
            fast.model.topk({**batch, "input_ids": batch["input_ids"] + i}, K)
        assert server.stats["rate_limited"] >= 2 and fast.details["retries"] == server.stats["rate_limited"]
        assert server.stats["answered"] == 20
    with TeacherServer(teacher, "causal_lm", token=TOKEN, rate_limit=10) as server:
        polite = HTTPTopKTeacher(url=server.url, k=K, token_env="HTTP_TOPK_TEST_TOKEN", rate_limit=8,
                                 cache=str(tmp_path / "b")).load(None)
        started = time.monotonic()
        for i in range(8):
            polite.model.topk({**batch, "input_ids": batch["input_ids"] + i}, K)
        assert server.stats["rate_limited"] == 0 and polite.details["retries"] == 0
        assert time.monotonic() - started >= 7 / 8 - 0.05  # spaced 1/8 s apart

    class Slow(_Junk):
        def do_POST(self):  # noqa: N802
            time.sleep(0.5)
            super().do_POST()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        slow = HTTPTopKTeacher(url=f"http://127.0.0.1:{httpd.server_address[1]}", k=K, token_env="HTTP_TOPK_TEST_TOKEN",
                               timeout_s=0.1, max_retries=1, backoff_s=0.01, cache=str(tmp_path / "c")).load(None)
        with pytest.raises(TeacherHTTPError, match=r"failed 2 times \(last: timeout: no answer within 0\.1 s\)"):
            slow.model.topk(batch, K)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_options_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="url must start with http"):
        HTTPTopKTeacher.Options(url="127.0.0.1:8000")
    with pytest.raises(ValidationError, match="must not hold credentials"):
        HTTPTopKTeacher.Options(url="http://user:secret@127.0.0.1:8000")
    with pytest.raises(ValidationError, match="schema"):
        HTTPTopKTeacher.Options(url="http://127.0.0.1:8000", schema="grpc")
    model = HTTPTopKTeacher(url="http://127.0.0.1:9", k=4, token_env=None).load(None).model
    with pytest.raises(ValueError, match=r"asks for the top 8, but the teacher asks the endpoint for k=4"):
        model.topk({"input_ids": torch.ones(1, 2, dtype=torch.long)}, 8)
