"""The openai engine (``endpoint.py``): the engine seam over an OpenAI-compatible HTTP API.

Two servers on loopback. ``FakeEndpoint``, a stdlib HTTP server in a thread scripted by each
test, drives the client's own logic in milliseconds: the requests it sends, 429/5xx/timeout
retries with backoff, a server that never comes back, a prompt over the context, the key. vLLM's
own OpenAI-compatible server (the CPU build, on the tiny random model), started by a fixture,
runs a whole generation and a kill-and-restart mid-run, with exact ids and counts.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import free_port, read_parts, tiny_raw
from test_generate import EXPECTED_ROWS, GENERATION_REQUESTS, committed_requests, planned_ids

from anyclf_ray import pipeline
from anyclf_ray.core import config, loading, runtime
from anyclf_ray.core.results import PlannedRows
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.llm import budgets, endpoint, engine

SERVED = "tiny-random"  # the name the servers serve the model under
KEY_ENV = "ANYCLF_TEST_API_KEY"
KEY = "sk-test-6f1c0a9e4b7d2358"
TREE_REQUESTS = {"tree/source_type": 1, "tree/topic": 4, "tree/subtopic": 8}


def items_answer(body: dict) -> dict:
    """A chat completion whose content is schema-valid items (what ``test_engine.FakeEngine``
    writes), or, for a choice, every letter's log-probability at the first token."""
    if body.get("logprobs"):
        top = [{"token": letter, "logprob": math.log(0.5)} for letter in "AB"]
        message = {"role": "assistant", "content": "A"}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "length",
                             "logprobs": {"content": [{"token": "A", "logprob": top[0]["logprob"],
                                                       "top_logprobs": top}]}}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}}
    schema = body["response_format"]["json_schema"]["schema"]
    key = next(iter(schema["items"]["properties"]))
    items = [{key: f"Item {i} of a fake answer, which the test endpoint wrote with seed {body['seed']}"}
             for i in range(schema["minItems"])]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(items)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10 * len(items), "total_tokens": 0}}


class FakeEndpoint:
    """An OpenAI-compatible API on loopback, in a thread. ``reply(body, calls)`` answers each chat
    request (``calls``: the chat requests so far, this one included) with (status, JSON, headers);
    ``GET /models`` lists ``SERVED``. Every chat request is kept: its body and Authorization."""

    def __init__(self, reply=None):
        self.reply = reply or (lambda body, calls: (200, items_answer(body), {}))
        self.requests: list[tuple[dict, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self._send(200, {"object": "list", "data": [{"id": SERVED, "object": "model"}]}, {})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((body, self.headers.get("Authorization")))
                    calls = len(fake.requests)
                self._send(*fake.reply(body, calls))

            def _send(self, status, payload, headers):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeEndpoint()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(endpoint, "BACKOFF_FIRST_SECONDS", 0.02)


def client(url: str, key: str | None = None, **settings) -> endpoint.EndpointEngine:
    placed = config.EngineSpec(kind="openai", base_url=url, **settings)
    secret = None if key is None else endpoint.SecretStr(key)
    return endpoint.EndpointEngine(config.ModelSpec(name=SERVED), placed, config.SamplingSpec(), secret)


SCHEMA = {"type": "array", "minItems": 2, "maxItems": 2,
          "items": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}


def prompt(text: str = "Write two texts.", **fields) -> engine.Prompt:
    return engine.Prompt(**{"text": text, "schema": SCHEMA, "seed": 7, "max_tokens": 64, **fields})


def test_a_request_carries_the_message_schema_seed_and_sampling(fake):
    found = client(fake.url).complete([prompt(temperature=0.3)])
    body, authorization = fake.requests[0]
    assert body == {
        "model": SERVED, "messages": [{"role": "user", "content": "Write two texts."}], "seed": 7, "max_tokens": 64,
        "temperature": 0.3, "top_p": 0.95, "repetition_penalty": 1.1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "items", "schema": SCHEMA, "strict": True}},
    }
    assert authorization is None  # no key named, none sent
    assert [json.loads(c.text)[0]["text"][:6] for c in found] == ["Item 0"]
    assert (found[0].finish_reason, found[0].tokens_in, found[0].tokens_out) == ("stop", 100, 20)  # from usage


def test_the_repetition_penalty_is_left_out_for_apis_that_refuse_it(fake):
    client(fake.url, send_repetition_penalty=False).complete([prompt()])
    assert "repetition_penalty" not in fake.requests[0][0] and fake.requests[0][0]["temperature"] == 0.8


def test_a_choice_reads_each_letter_from_the_first_tokens_top_logprobs():
    top = [{"token": "A", "logprob": math.log(0.3)}, {"token": " A", "logprob": math.log(0.2)},
           {"token": "C", "logprob": math.log(0.1)}, {"token": "Answer", "logprob": math.log(0.4)}]
    found = endpoint.option_logprobs(top, ("A", "B", "C"))
    assert found[0] == pytest.approx(math.log(0.5)) and found[1] == -math.inf and found[2] == pytest.approx(
        math.log(0.1))


def test_a_choice_asks_one_greedy_token_and_its_log_probabilities(fake):
    found = client(fake.url, top_logprobs=5).complete([prompt("Which? A or B", options=("A", "B"), max_tokens=1)])
    body = fake.requests[0][0]
    assert {key: body[key] for key in ("max_tokens", "temperature", "logprobs", "top_logprobs")} == {
        "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": 5}
    assert "response_format" not in body
    assert found[0].option_logprobs == pytest.approx((math.log(0.5), math.log(0.5)))


def test_429_and_5xx_are_sent_again_with_backoff_then_answered(monkeypatch):
    pauses = []
    monkeypatch.setattr(endpoint.time, "sleep", pauses.append)
    script = {1: (429, {"error": {"message": "slow down"}}, {"Retry-After": "0.5"}),
              2: (503, {"error": {"message": "loading"}}, {}), 3: (500, {"message": "oops"}, {})}
    server = FakeEndpoint(lambda body, calls: script.get(calls) or (200, items_answer(body), {}))
    try:
        asked = client(server.url)
        found = asked.complete([prompt()])
    finally:
        server.close()
    assert found[0].finish_reason == "stop" and len(server.requests) == 4
    # Retry-After (0.5 s) over the first pause (0.02 s), then the pauses doubling from there, +-20%.
    assert pauses[0] == 0.5 and [round(p / b, 2) for p, b in zip(pauses[1:], (0.04, 0.08))] == [
        pytest.approx(1, abs=0.2)] * 2
    assert asked.traffic() == endpoint.Traffic(sent=4, retried=collections.Counter({"429": 1, "503": 1, "500": 1}))
    assert asked.traffic() == endpoint.Traffic()  # counted once


def test_a_timeout_is_sent_again():
    def slow_first(body, calls):
        if calls == 1:
            time.sleep(1.0)
        return 200, items_answer(body), {}

    server = FakeEndpoint(slow_first)
    try:
        asked = client(server.url, timeout_seconds=0.3)
        found = asked.complete([prompt()])
    finally:
        server.close()
    assert found[0].finish_reason == "stop"
    assert asked.traffic().retried == {"timeout": 1}


def test_an_endpoint_that_never_answers_fails_the_requests_after_retry_seconds_never_drops_them():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
    asked = client(url, retry_seconds=0.5)
    started = time.monotonic()
    answered = engine.answer(asked, engine.requests_table(
        [{"request_id": f"r{i}", "prompt": "Write two texts.", "item_key": "text", "n_items": 2, "max_chars": 80,
          "max_tokens": 64} for i in range(3)]), config.SamplingSpec(max_retries=2))
    assert time.monotonic() - started < 5  # bounded: about retry_seconds, not max_retries times it
    assert answered["request_id"].to_pylist() == ["r0", "r1", "r2"] and not any(answered["ok"].to_pylist())
    assert answered["attempts"].to_pylist() == [1, 1, 1]  # final: the engine already asked again
    assert all(error.startswith("ConnectError") and "engine.retry_seconds (0.5 s)" in error
               for error in answered["error"].to_pylist())
    traffic = asked.traffic()
    assert traffic.unanswered == 3 and traffic.retried["connection"] >= 3 and traffic.sent > 3


TOO_LONG = [  # (status, message, the prompt's tokens) as servers word it
    (400, "This model's maximum context length is 2048 tokens. However, your prompt contains 2301 input tokens, "
          "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt.",
     2301),  # vLLM 0.32
    (400, "This model's maximum context length is 2048 tokens. However, your prompt contains 9000 characters (more "
          "than 8192 characters, which is the upper bound for 2048 input tokens).", None),  # vLLM, before tokenising
    (400, "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
     9000),  # OpenAI
    (422, "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens "
          "and 200 `max_new_tokens`", None),  # TGI
]


@pytest.mark.parametrize(("status", "message", "tokens"), TOO_LONG)
def test_a_prompt_over_the_context_is_counted_as_too_long_and_not_asked_again(status, message, tokens):
    server = FakeEndpoint(lambda body, calls: (status, {"error": {"message": message, "code": status}}, {}))
    try:
        asked = client(server.url)
        answered = engine.answer(asked, engine.requests_table([{
            "request_id": "r", "prompt": "long", "item_key": "text", "n_items": 2, "max_chars": 80,
            "max_tokens": 64}]), config.SamplingSpec())
    finally:
        server.close()
    assert len(server.requests) == 1 and answered["ok"].to_pylist() == [False]
    prompt = f"the prompt's {tokens} tokens" if tokens else "the prompt"
    assert answered["error"].to_pylist() == [
        f"{prompt} and its answer budget of 64 do not fit the model's context (model.max_model_len)"]


def test_any_other_refusal_fails_at_once_with_the_servers_message():
    server = FakeEndpoint(lambda body, calls: (422, {"error": {"message": "top_p must be in (0, 1]"}}, {}))
    try:
        asked = client(server.url)
        found = asked.complete([prompt()])
    finally:
        server.close()
    assert len(server.requests) == 1 and found[0].finish_reason == engine.NO_ANSWER
    assert found[0].text == "the endpoint refused the request: HTTP 422: top_p must be in (0, 1]"


def test_requests_in_flight_are_bounded_by_max_concurrency_split_among_replicas():
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def counting(body, calls):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return 200, items_answer(body), {}

    server = FakeEndpoint(counting)
    try:
        found = client(server.url, max_concurrency=6, replicas=2).complete([prompt(seed=i) for i in range(20)])
    finally:
        server.close()
    assert [c.finish_reason for c in found] == ["stop"] * 20
    assert [json.loads(c.text)[0]["text"].rsplit(" ", 1)[1] for c in found] == [str(i) for i in range(20)]  # in order
    assert most[0] == 3  # 6 for the endpoint, 3 a replica


# -- the spec and the checks before any work ------------------------------------------------------


def openai_raw(output: Path, run_id: str, url: str, **engine_settings) -> dict:
    raw = tiny_raw(output, run_id, dedup={"enabled": False}, train={"enabled": False})
    raw["model"] = {"name": SERVED}
    raw["engine"] = {"kind": "openai", "base_url": url, "batch_size": 16, **engine_settings}
    return raw


@pytest.mark.parametrize(("engine_settings", "model", "error"), [
    ({}, {"name": "builtin:tiny-random"}, "model.name: builtin:tiny-random runs in-process"),
    ({"tensor_parallel_size": 2}, None, "engine.tensor_parallel_size: a setting of the in-process vLLM engine"),
    ({"device": "cuda"}, None, "engine.device: a setting of the in-process vLLM engine"),
    ({"threads": 2}, None, "engine.threads: a setting of the in-process vLLM engine"),
    ({}, {"name": SERVED, "dtype": "float32"}, "model.dtype: a setting of the in-process vLLM engine"),
    ({"base_url": "localhost:8000"}, None, "engine.base_url: 'localhost:8000' is not an http(s) URL"),
    ({"api_key_env": "sk-live-abc"}, None, "engine.api_key_env: must be the name of an environment variable"),
    ({"replicas": 4, "max_concurrency": 3}, None, "engine.max_concurrency: 3 requests in flight cannot be split"),
    ({"top_logprobs": 0}, None, "engine.top_logprobs: must be at least 1"),
])
def test_settings_the_openai_kind_would_ignore_or_cannot_use_are_refused(tmp_path, engine_settings, model, error):
    raw = openai_raw(tmp_path, "bad", "http://127.0.0.1:8000/v1", **engine_settings)
    if model:
        raw["model"] = model
    with pytest.raises(config.ConfigError) as found:
        loading.parse(raw)
    assert str(found.value).startswith(error) and "sk-live" not in str(found.value)


def test_endpoint_settings_are_refused_for_the_vllm_kind(tmp_path):
    with pytest.raises(config.ConfigError, match=r"^engine.retry_seconds: applies to engine.kind openai only"):
        loading.parse(tiny_raw(tmp_path, "bad", engine={"retry_seconds": 10}))


def test_an_openai_spec_defaults_to_light_clients_and_a_model_the_budgets_estimate(tmp_path):
    spec = loading.parse(openai_raw(tmp_path, "ok", "http://127.0.0.1:8000/v1/"))
    assert spec.engine.base_url == "http://127.0.0.1:8000/v1" and spec.engine.cpus_per_replica == 0.1
    assert budgets.tokenizer(SERVED) is None and budgets.tokenizer("qwen2.5:7b") is None  # no local tokenizer
    assert budgets.prompt_tokens(spec, "x" * 300) == 100  # characters a token, as for any model not here


def test_a_missing_key_variable_fails_in_one_line_before_any_work(tmp_path, monkeypatch, fake, no_cluster):
    monkeypatch.delenv(KEY_ENV, raising=False)
    spec = loading.parse(openai_raw(tmp_path, "nokey", fake.url, api_key_env=KEY_ENV))
    with pytest.raises(config.ConfigError, match=rf"^engine.api_key_env: the environment variable {KEY_ENV} is not"):
        pipeline.run(spec)
    assert not fake.requests


def test_a_wrong_url_or_model_fails_in_one_line_before_any_work(tmp_path, fake):
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(config.ConfigError, match=rf"^engine.base_url: nothing answers at {nowhere} \(ConnectError\)"):
        pipeline.run(loading.parse(openai_raw(tmp_path, "nowhere", nowhere)))
    raw = openai_raw(tmp_path, "other", fake.url)
    raw["model"] = {"name": "other-model"}
    with pytest.raises(config.ConfigError, match=rf"^model.name: 'other-model' is not served at .*; it serves "
                                                 rf"'{SERVED}'$"):
        pipeline.run(loading.parse(raw))
    assert not fake.requests


# -- a whole run on the fake endpoint (Ray) ----------------------------------------------------------


def every_file(*roots: str | Path) -> list[Path]:
    return [path for root in roots for path in Path(root).rglob("*") if path.is_file()]


@pytest.mark.slow
def test_requests_of_an_endpoint_that_stays_down_are_reported_failed_not_dropped(local_ray, tmp_path):
    down = threading.Event()

    def goes_down(body, calls):  # answers the tree, then nothing but 503s
        if "response_format" in body and body["response_format"]["json_schema"]["schema"]["items"][
                "properties"].get("text"):
            down.set()
        return (503, {"error": {"message": "gone"}}, {}) if down.is_set() else (200, items_answer(body), {})

    server = FakeEndpoint(goes_down)
    try:
        # Long enough for a retry at the first backoff (1 s: the workers' own, not this module's).
        spec = loading.parse(openai_raw(tmp_path, "down", server.url, retry_seconds=3, max_concurrency=64))
        result = pipeline.run(spec)["generate"]
    finally:
        server.close()
    report = result.report
    assert result.status == "incomplete" and report.rows.written == 0
    assert report.failures.requests == GENERATION_REQUESTS and report.failures.rows_lost == EXPECTED_ROWS
    assert report.engine.passes["generate"].model_dump() == {"requests": GENERATION_REQUESTS,
                                                             "failed": GENERATION_REQUESTS}
    assert report.engine.http.unanswered == GENERATION_REQUESTS
    assert report.engine.http.retried["503"] >= GENERATION_REQUESTS  # each asked again before it failed
    location = RunLocation(spec.output, "down")
    failed = pa.concat_tables([location.read_table(path) for path in report.failures.files
                               if "tree" not in path])
    assert failed.num_rows == GENERATION_REQUESTS
    assert set(failed["error"].to_pylist()) == {
        "HTTP 503: gone; still failing after engine.retry_seconds (3 s)"}


# -- vLLM's own OpenAI-compatible server --------------------------------------------------------------


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` (the CPU build) on the tiny model, on
    loopback, with the environment the project gives its own engines, answering requests that
    carry ``KEY``. ``kill`` (SIGKILL) and ``start`` keep its port, as a server restarting would."""

    def __init__(self, model: str, log: Path):
        self.model, self.port, self.log = model, free_port(), open(log, "a")
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        """Start it and wait for ``/health``; the seconds that took."""
        started = time.monotonic()
        env = {**os.environ, **engine.engine_env(config.EngineSpec(device="cpu"))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
             "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
             "--host", "127.0.0.1", "--port", str(self.port), "--max-logprobs", "-1", "--seed", "0",
             "--api-key", KEY,
             # As the in-process engine on CPU (config.EngineSpec.chunked_prefill): the CPU build cannot
             # rewind a seeded request's sampler after a partial prefill, and its engine dies of it.
             "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
             # The in-process engine's structured outputs: guidance, no whitespace between JSON tokens.
             "--structured-outputs-config", json.dumps({"backend": "guidance", "disable_any_whitespace": True})],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while time.monotonic() - started < timeout and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.5)
        self.kill()
        pytest.fail(f"vLLM's server did not answer /health in {timeout:.0f} s; see {self.log.name}")

    def kill(self) -> None:
        """SIGKILL to the server and any process it started."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def metric(self, name: str) -> float:
        """A Prometheus counter of the server (summed over its labels)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return sum(float(value) for value in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, tiny_model):
    server = VLLMServer(tiny_model, tmp_path_factory.mktemp("vllm") / "server.log")
    server.start()
    yield server
    server.kill()
    server.log.close()


@pytest.mark.slow
def test_a_generation_through_vllms_server_writes_every_planned_row_with_its_usage(local_ray, vllm_server, tmp_path,
                                                                                     monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    before = {name: vllm_server.metric(name) for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                                                          "vllm:request_success_total")}
    spec = loading.parse(openai_raw(tmp_path, "served", vllm_server.url, api_key_env=KEY_ENV, replicas=2))
    with caplog.at_level("DEBUG"):
        result = pipeline.run(spec)["generate"]
    report = result.report
    assert result.status == "complete" and report.failures.requests == 0
    assert report.rows == PlannedRows(expected=EXPECTED_ROWS, written=EXPECTED_ROWS, missing=0)
    location = RunLocation(spec.output, "served")
    rows = read_parts(location)
    assert sorted(rows["id"].to_pylist()) == sorted(planned_ids(spec))  # every leaf and sample, once
    assert set(rows["model"].to_pylist()) == {SERVED}
    assert {name: counts.model_dump() for name, counts in report.engine.passes.items()} == {
        **{name: {"requests": n, "failed": 0} for name, n in TREE_REQUESTS.items()},
        "generate": {"requests": GENERATION_REQUESTS, "failed": 0}}
    assert (report.engine.kind, report.engine.device, report.engine.replicas) == ("openai", "cpu", 2)
    # Tokens and requests as the server itself counted them: the figures are the responses' usage.
    served = {name: vllm_server.metric(name) - value for name, value in before.items()}
    assert report.llm.tokens_in == served["vllm:prompt_tokens_total"] > 0
    assert report.llm.tokens_out == served["vllm:generation_tokens_total"] > 0
    assert report.engine.http.sent == served["vllm:request_success_total"] >= report.llm.requests
    assert report.engine.http.retried == {} and report.engine.http.unanswered == 0
    # The server answers only with the key; the key is in no file of the run, no Ray log, no log line.
    assert location.read_json("spec.json")["spec"]["engine"]["api_key_env"] == KEY_ENV  # the name, only
    leaks = [path for path in every_file(location.path(), runtime.logs_folder()) if KEY.encode() in path.read_bytes()]
    assert leaks == [] and KEY not in caplog.text


@pytest.mark.slow
def test_a_key_the_server_refuses_fails_in_one_line(vllm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    placed = config.EngineSpec(kind="openai", base_url=vllm_server.url, api_key_env=KEY_ENV)
    with pytest.raises(config.ConfigError, match=rf"^engine.api_key_env: {re.escape(vllm_server.url)} refused the "
                                                 rf"request \(HTTP 401\); check the key in {KEY_ENV}$"):
        endpoint.check(config.ModelSpec(name=SERVED), placed)
    with pytest.raises(config.ConfigError, match=r"\(HTTP 401\); name the environment variable that holds the key"):
        endpoint.check(config.ModelSpec(name=SERVED), placed.model_copy(update={"api_key_env": None}))


@pytest.mark.slow
def test_a_choice_through_vllms_server_reads_every_options_log_probability(vllm_server):
    asked = client(vllm_server.url, KEY, top_logprobs=-1)  # the random model's letters are rarely in the top 20
    found = asked.complete([prompt("Is this text positive?\nA. yes\nB. no\nAnswer with the letter.",
                                   options=("A", "B", "C"), max_tokens=1)] * 2)
    assert found[0].tokens_out == 1 and found[0].tokens_in > 10
    logprobs = found[0].option_logprobs
    assert found[1].option_logprobs == pytest.approx(logprobs, abs=1e-4)  # greedy, at temperature 0
    assert len(logprobs) == 3 and all(-30 < value < 0 for value in logprobs)
    assert math.fsum(math.exp(value) for value in logprobs) < 1


@pytest.mark.slow
def test_a_server_killed_and_restarted_mid_run_loses_and_repeats_nothing(local_ray, vllm_server, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    spec = loading.parse(openai_raw(tmp_path, "restart", vllm_server.url, api_key_env=KEY_ENV, max_concurrency=8))
    tree = sum(TREE_REQUESTS.values())
    restart: dict[str, float] = {}

    def kill_then_restart() -> None:  # once the generation pass has answered a few requests
        answered = vllm_server.metric("vllm:request_success_total") + tree + 4
        while vllm_server.metric("vllm:request_success_total") < answered:
            time.sleep(0.1)
        vllm_server.kill()
        restart["seconds"] = vllm_server.start()

    chaos = threading.Thread(target=kill_then_restart, daemon=True)
    chaos.start()
    result = pipeline.run(spec)["generate"]
    chaos.join(timeout=600)
    report = result.report
    assert restart["seconds"] > 0 and report.engine.http.retried.get("connection", 0) > 0  # the kill hit the run
    assert result.status == "complete" and report.failures.requests == 0 and report.engine.http.unanswered == 0
    assert report.rows == PlannedRows(expected=EXPECTED_ROWS, written=EXPECTED_ROWS, missing=0)
    location = RunLocation(spec.output, "restart")
    ids = read_parts(location)["id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == planned_ids(spec)
    requests = committed_requests(location)  # every generation request committed once
    assert len(requests) == len(set(requests)) == GENERATION_REQUESTS
    assert report.engine.passes["generate"].model_dump() == {"requests": GENERATION_REQUESTS, "failed": 0}
