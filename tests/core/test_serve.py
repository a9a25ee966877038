"""``potstill serve-teacher`` / :class:`potstill.serve.TeacherServer`: a real HTTP server on 127.0.0.1 serving a
local teacher's top-k log-probabilities in potstill's schema and OpenAI's, behind a token, a budget and a rate
limit; the answers are the model's own log-softmax, position by position."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import pytest
import torch

from potstill.serve import TeacherServer, byte_token, request_key, token_ids, token_strings
from potstill.techniques import LoadedModel

TOKEN = "serve-test-token-81d2"


@pytest.fixture(scope="module")
def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def server(model):
    with TeacherServer(LoadedModel(model=model), "causal_lm", token=TOKEN) as running:
        yield running


def _call(url: str, method: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
    host, port = url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.headers), json.loads(response.read())
    finally:
        connection.close()


def _logp(model, ids, mask=None):
    with torch.no_grad():
        mask = torch.ones_like(ids) if mask is None else mask
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)


def test_topk_is_the_models_log_softmax_per_position(server, model):
    ids = torch.randint(1, 256, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    status, _, answer = _call(server.url, "POST", "/v1/topk", {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "k": 5})
    assert status == 200 and answer["vocab_size"] == 256 and answer["k"] == 5
    values, indices = _logp(model, ids, mask).topk(5, -1)
    assert torch.equal(torch.tensor(answer["indices"]), indices)
    assert torch.equal(torch.tensor(answer["logprobs"]), values)  # JSON carries float32 exactly
    # ragged rows without a mask: each row answered at its own length, as if alone
    status, _, ragged = _call(server.url, "POST", "/v1/topk", {"input_ids": [[5, 6, 7], [8, 9]], "k": 2})
    assert status == 200 and [len(r) for r in ragged["indices"]] == [3, 2]
    alone = _logp(model, torch.tensor([[8, 9]])).topk(2, -1)
    assert torch.allclose(torch.tensor(ragged["logprobs"][1]), alone.values[0], atol=1e-5)


def test_openai_completions_echo_scores_each_prompt_token_given_the_ones_before(server, model):
    prompt = [72, 105, 10, 0, 200]  # "Hi\n", a NUL byte and a non-ASCII byte
    body = {"model": "m", "prompt": [prompt, prompt[:2]], "max_tokens": 0, "echo": True, "logprobs": 3}
    status, _, answer = _call(server.url, "POST", "/v1/completions", body)
    assert status == 200 and answer["object"] == "text_completion" and len(answer["choices"]) == 2
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["H", "i", "bytes:\\x0a", "bytes:\\x00", "bytes:\\xc8"]
    assert logprobs["top_logprobs"][0] is None and logprobs["token_logprobs"][0] is None
    logp = _logp(model, torch.tensor([prompt]))[0]
    strings = token_strings(None, 256)
    for i in range(1, len(prompt)):
        values, indices = logp[i - 1].topk(3)
        assert logprobs["top_logprobs"][i] == {strings[int(j)]: float(v) for v, j in zip(values, indices)}
        assert logprobs["token_logprobs"][i] == pytest.approx(float(logp[i - 1, prompt[i]]))
    assert answer["usage"]["prompt_tokens"] == 7 and answer["usage"]["completion_tokens"] == 0
    # max_tokens 1 appends the greedy token, whose top_logprobs is the distribution after the whole prompt
    _, _, one = _call(server.url, "POST", "/v1/completions", {**body, "prompt": [prompt], "max_tokens": 1})
    last = one["choices"][0]["logprobs"]
    assert len(last["top_logprobs"]) == len(prompt) + 1
    assert last["tokens"][-1] == strings[int(logp[-1].argmax())]
    assert list(last["top_logprobs"][-1].values()) == [float(v) for v in logp[-1].topk(3).values]
    _, _, refused = _call(server.url, "POST", "/v1/completions", {**body, "max_tokens": 5})[0:3]
    assert "max_tokens must be 0 or 1" in refused["error"]["message"]


def test_token_strings_round_trip(tokenizer):
    strings = token_strings(None, 256)
    assert len(set(strings)) == 256 and byte_token(65) == "A" and byte_token(255) == "bytes:\\xff"
    assert token_ids(None, 256)["bytes:\\x0a"] == 10
    # with a tokenizer: its own token strings, one per id, so the client maps every answer back to its id
    ids = token_ids(tokenizer, len(tokenizer))
    assert len(ids) == len(tokenizer) and ids["[CLS]"] == tokenizer.cls_token_id and ids["##ing"] == tokenizer.convert_tokens_to_ids("##ing")


def test_a_string_prompt_is_tokenized(server):
    status, _, answer = _call(server.url, "POST", "/v1/completions", {"prompt": "Hi!", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert status == 200 and answer["choices"][0]["logprobs"]["tokens"] == ["H", "i", "!"] and answer["choices"][0]["text"] == "Hi!"


def test_a_missing_or_wrong_token_is_a_json_401(server):
    for token in (None, "nope"):
        status, _, answer = _call(server.url, "POST", "/v1/topk", {"input_ids": [[1, 2]]}, token=token)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key" and "Bearer" in answer["error"]["message"]
    status, _, _ = _call(server.url, "GET", "/v1/stats", token="nope")
    assert status == 401
    assert _call(server.url, "GET", "/health", token=None)[0] == 200


@pytest.mark.parametrize("raw,message", [
    (b"{not json", "not JSON"),
    (json.dumps({"input_ids": []}).encode(), "non-empty list"),
    (json.dumps({"input_ids": [[1, 999]]}).encode(), r"integers in [0, 256)"),
    (json.dumps({"input_ids": [[1, 2]], "k": 0}).encode(), "from 1 to 256"),
    (json.dumps({"input_ids": [[1, 2]], "attention_mask": [[1]]}).encode(), "input_ids' shape"),
])
def test_malformed_requests_are_a_json_400(server, raw, message):
    status, _, answer = _call(server.url, "POST", "/v1/topk", raw=raw)
    assert status == 400 and message in answer["error"]["message"]


def test_budget_rate_limit_and_injected_failures(model):
    loaded = LoadedModel(model=model)
    body = {"input_ids": [[1, 2, 3]], "k": 2}
    with TeacherServer(loaded, "causal_lm", token=TOKEN, budget=2) as server:
        assert [_call(server.url, "POST", "/v1/topk", body)[0] for _ in range(2)] == [200, 200]
        status, headers, answer = _call(server.url, "POST", "/v1/topk", body)
        assert status == 429 and answer["error"]["code"] == "insufficient_quota" and "budget of 2" in answer["error"]["message"]
        assert "Retry-After" not in headers  # a spent quota is not worth retrying
        key = request_key("/v1/topk", json.dumps(body).encode())
        assert server.answered_keys == {key: 2} and server.stats["over_budget"] == 1
    with TeacherServer(loaded, "causal_lm", token=TOKEN, rate_limit=1) as server:
        assert _call(server.url, "POST", "/v1/topk", body)[0] == 200
        status, headers, answer = _call(server.url, "POST", "/v1/topk", body)
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
        assert headers["Retry-After"] == "1" and 0 < int(headers["retry-after-ms"]) <= 1000
    with TeacherServer(loaded, "causal_lm", token=TOKEN, fail_every=2) as server:
        outcomes = []
        for _ in range(4):
            try:
                outcomes.append(_call(server.url, "POST", "/v1/topk", body)[0])
            except (ConnectionError, http.client.HTTPException):
                outcomes.append("dropped")
        assert outcomes == [200, 500, 200, "dropped"] and server.stats["answered"] == 2


def test_the_cli_serves_a_model_folder(model, tmp_path):
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    env = {**os.environ, "MY_TEACHER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    missing = subprocess.run([sys.executable, "-m", "potstill.cli", "serve-teacher", str(folder), "--port", "0",
                              "--token-env", "UNSET_TOKEN_VAR_X"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "set the environment variable UNSET_TOKEN_VAR_X" in missing.stderr
    (tmp_path / "teacher.yaml").write_text("teacher: {name: hf, path: teacher}\n")  # a spec's teacher entry
    process = subprocess.Popen([sys.executable, "-m", "potstill.cli", "serve-teacher", str(tmp_path / "teacher.yaml"),
                                "--port", "0", "--token-env", "MY_TEACHER_TOKEN", "--budget", "1", "--rate-limit", "50/s"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving ") and "http://127.0.0.1:" in line, (line, process.poll())
        url = line.split(" on ")[1].split(" ")[0]
        assert TOKEN not in line
        assert _call(url, "POST", "/v1/topk", {"input_ids": [[1, 2]]}, token="bad")[0] == 401
        status, _, answer = _call(url, "POST", "/v1/topk", {"input_ids": [[1, 2, 3]], "k": 4})
        assert status == 200
        assert torch.equal(torch.tensor(answer["indices"]), _logp(model, torch.tensor([[1, 2, 3]])).topk(4, -1).indices)
        assert _call(url, "POST", "/v1/topk", {"input_ids": [[1, 2, 3]], "k": 4})[2]["error"]["code"] == "insufficient_quota"
        stats = _call(url, "GET", "/v1/stats")[2]
        assert stats["answered"] == 1 and stats["unauthorized"] == 1 and stats["over_budget"] == 1
    finally:
        process.kill()
        _, err = process.communicate(timeout=10)
    assert TOKEN not in err
