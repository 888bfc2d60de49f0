"""The ``openai`` engine: the engine seam over an OpenAI-compatible chat completions API.

In: ``engine.Prompt``s, the endpoint's settings (``EngineSpec``: ``base_url``, ``api_key_env``,
``max_concurrency``, ``timeout_seconds``, ``retry_seconds``) and ``model.name``, the model it
serves. Out: one ``engine.Completion`` per prompt, from one HTTP request each (``POST
{base_url}/chat/completions``), its token counts from the response's ``usage``; and ``traffic()``,
the HTTP requests sent and retried, for the pool's figures.

The requests are the in-process engine's: one user message; items as JSON under the request's
schema (``response_format: json_schema``) with its seed, token budget and sampling; a choice as
one greedy token whose ``top_logprobs`` (``engine.top_logprobs`` of them) give each option
letter's log-probability. Up to ``max_concurrency / replicas`` requests of a replica are in
flight at once. A 429, a 5xx, a timeout or a lost connection is sent again with exponential
backoff (``Retry-After`` honoured) until ``retry_seconds`` have passed since the request's first
failure, so a server restarting within that time loses nothing; past it, or when the endpoint
refuses a request (any other 4xx), the completion is ``engine.NO_ANSWER``, which
``engine.answer`` reports as failed, never dropped. A prompt over the served model's context (a
400 saying so) is ``engine.PROMPT_TOO_LONG``; one that fits, with an answer budget that does not,
a vLLM server answers with a shorter budget (then retried as cut off, as any answer cut off).

The API key is read from the environment variable ``engine.api_key_env`` names, on the driver
(``api_key``), and travels to the replicas in their constructor's arguments as a ``SecretStr``:
not in a ``runtime_env``, which Ray's dashboard lists, and never in the spec, the manifests or a
log line. ``check`` probes the endpoint before any work starts.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from pydantic import SecretStr

from anyclf_ray.core.config import ConfigError, EngineSpec, ModelSpec, SamplingSpec
from anyclf_ray.llm.engine import NO_ANSWER, PROMPT_TOO_LONG, Completion, Prompt

log = logging.getLogger(__name__)

# Answers sent again after a pause: rate limits, server errors, and a server busy or restarting.
RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
CONNECT_SECONDS = 10.0
PROBE_SECONDS = 10.0
# How servers refuse a prompt over the context (vLLM and OpenAI: 400, "maximum context length";
# SGLang: "longer than the model's context length"; TGI: 422, "... tokens must be <= N"), and
# where they say its tokens (vLLM: "your prompt contains [at least] N input tokens"; OpenAI:
# "your messages resulted in N tokens").
CONTEXT_STATUS = frozenset({400, 413, 422})
CONTEXT_ERROR = re.compile(r"context.length|context_length_exceeded|must be <= \d+", re.I)
PROMPT_TOKENS = re.compile(r"(?:contains (?:at least )?|resulted in )(\d+) (?:input )?tokens", re.I)


def api_key(engine: EngineSpec) -> SecretStr | None:
    """The key in the variable ``engine.api_key_env`` names (None when it names none); ConfigError
    naming the field when the variable is unset or empty."""
    if engine.api_key_env is None:
        return None
    value = os.environ.get(engine.api_key_env, "")
    if not value.strip():
        raise ConfigError(f"engine.api_key_env: the environment variable {engine.api_key_env} is not set here; "
                          "export the endpoint's API key in it before the run (or set api_key_env: null for an "
                          "endpoint without a key)")
    return SecretStr(value.strip())


def _client(engine: EngineSpec, key: SecretStr | None, connections: int) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    return httpx.Client(base_url=f"{engine.base_url}/", headers=headers,
                        timeout=httpx.Timeout(engine.timeout_seconds, connect=CONNECT_SECONDS),
                        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


def check(model: ModelSpec, engine: EngineSpec) -> None:
    """ConfigError naming the field to fix unless the endpoint answers ``GET /models`` with the
    key and lists ``model.name`` (an endpoint that lists no models, or answers that call with
    another error, is only warned about: the requests themselves may still work)."""
    key = api_key(engine)
    with _client(engine, key, 1) as client:
        try:
            response = client.get("models", timeout=PROBE_SECONDS)
        except httpx.HTTPError as error:
            raise ConfigError(f"engine.base_url: nothing answers at {engine.base_url} ({type(error).__name__}); "
                              "start the server or fix the URL") from None
    if response.status_code in (401, 403):
        fix = (f"check the key in {engine.api_key_env}" if key
               else "name the environment variable that holds the key in engine.api_key_env")
        raise ConfigError(f"engine.api_key_env: {engine.base_url} refused the request (HTTP "
                          f"{response.status_code}); {fix}")
    try:
        served = [entry["id"] for entry in response.json()["data"]] if response.is_success else None
    except (ValueError, KeyError, TypeError):
        served = None
    if served is None:
        log.warning("engines: %s/models answered HTTP %d, not a list of models; %s is not checked",
                    engine.base_url, response.status_code, model.name)
    elif model.name not in served:
        raise ConfigError(f"model.name: {model.name!r} is not served at {engine.base_url}; it serves "
                          f"{', '.join(map(repr, served)) or 'no model'}")


@dataclasses.dataclass
class Traffic:
    """HTTP requests an engine sent (retries included), those sent again by reason (the HTTP
    status, ``timeout`` or ``connection``), and requests given up (``NO_ANSWER``)."""

    sent: int = 0
    retried: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unanswered: int = 0


class EndpointEngine:
    """``engine.Engine`` on an OpenAI-compatible endpoint: a thread per request in flight, up to
    ``engine.max_concurrency // engine.replicas``, over one pooled HTTP client."""

    def __init__(self, model: ModelSpec, engine: EngineSpec, sampling: SamplingSpec, key: SecretStr | None):
        self.model, self.engine, self.sampling = model.name, engine, sampling
        concurrency = max(1, engine.max_concurrency // engine.replicas)
        self.client = _client(engine, key, concurrency)
        self.threads = ThreadPoolExecutor(concurrency, thread_name_prefix="endpoint")
        self.lock = threading.Lock()
        self.counts = Traffic()
        # httpx logs each request at INFO: a line per request would fill the replica's log.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def complete(self, prompts: list[Prompt]) -> list[Completion]:
        return list(self.threads.map(self._ask, prompts))

    def traffic(self) -> Traffic:
        """The traffic since the last call (counts start again at zero)."""
        with self.lock:
            found, self.counts = self.counts, Traffic()
        return found

    def body(self, prompt: Prompt) -> dict:
        """The chat completions request for ``prompt``."""
        body: dict = {"model": self.model, "messages": [{"role": "user", "content": prompt.text}], "seed": prompt.seed}
        if prompt.options:  # one greedy token; the options' log-probabilities are read at it
            return {**body, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                    "top_logprobs": self.engine.top_logprobs}
        body.update(
            max_tokens=prompt.max_tokens,
            temperature=self.sampling.temperature if prompt.temperature is None else prompt.temperature,
            top_p=self.sampling.top_p,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "items", "schema": prompt.schema, "strict": True}},
        )
        if self.engine.send_repetition_penalty:
            body["repetition_penalty"] = self.sampling.repetition_penalty
        return body

    def _ask(self, prompt: Prompt) -> Completion:
        """One request, sent again (backoff) on what a later try may survive; its completion."""
        body, first_failure, pause = self.body(prompt), None, BACKOFF_FIRST_SECONDS
        while True:
            with self.lock:
                self.counts.sent += 1
            retry_after = None
            try:
                response = self.client.post("chat/completions", json=body)
            except httpx.TimeoutException as error:
                reason, detail = "timeout", f"{type(error).__name__} after {self.engine.timeout_seconds:g} s"
            except httpx.TransportError as error:
                reason, detail = "connection", f"{type(error).__name__}: {error}"
            else:
                if response.is_success:
                    return self._completion(prompt, response)
                if response.status_code not in RETRIED_STATUS:
                    return self._refused(response)
                reason, detail = str(response.status_code), f"HTTP {response.status_code}: {_message(response)}"
                retry_after = _seconds(response.headers.get("retry-after"))
            now = time.monotonic()
            first_failure = first_failure or now
            # Jittered, so that requests failed together are not all sent again at the same instant.
            wait = max(min(pause, BACKOFF_MAX_SECONDS) * random.uniform(0.8, 1.2), retry_after or 0.0)
            if now + wait - first_failure > self.engine.retry_seconds:
                return self._no_answer(f"{detail}; still failing after engine.retry_seconds "
                                       f"({self.engine.retry_seconds:g} s)")
            with self.lock:
                self.counts.retried[reason] += 1
            time.sleep(wait)
            pause *= 2

    def _no_answer(self, why: str) -> Completion:
        with self.lock:
            self.counts.unanswered += 1
        return Completion(why, NO_ANSWER, 0, 0)

    def _refused(self, response: httpx.Response) -> Completion:
        message = _message(response)
        if response.status_code in CONTEXT_STATUS and CONTEXT_ERROR.search(message):
            found = PROMPT_TOKENS.search(message)
            return Completion("", PROMPT_TOO_LONG, int(found.group(1)) if found else 0, 0)
        return self._no_answer(f"the endpoint refused the request: HTTP {response.status_code}: {message}")

    def _completion(self, prompt: Prompt, response: httpx.Response) -> Completion:
        try:
            found = response.json()
            choice, usage = found["choices"][0], found.get("usage") or {}
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return self._no_answer(f"the endpoint's answer is not a chat completion: {response.text[:200]!r}")
        logprobs = None
        if prompt.options:
            content = (choice.get("logprobs") or {}).get("content") or []
            logprobs = option_logprobs(content[0].get("top_logprobs") or [], prompt.options) if content else None
        return Completion(text=text, finish_reason=choice.get("finish_reason") or "stop",
                          tokens_in=usage.get("prompt_tokens") or 0, tokens_out=usage.get("completion_tokens") or 0,
                          option_logprobs=logprobs)


def option_logprobs(top: list[dict], options: tuple[str, ...]) -> tuple[float, ...]:
    """Each option's log-probability among the first token's ``top_logprobs`` (``token``,
    ``logprob``): the tokens that read as the option once stripped of spaces, added up ("A" and
    " A" are one answer); -inf for an option none of them reads as."""
    found = dict.fromkeys(options, -math.inf)
    for entry in top:
        token = str(entry.get("token", "")).strip()
        if token in found:
            found[token] = float(np.logaddexp(found[token], float(entry["logprob"])))
    return tuple(found.values())


def _message(response: httpx.Response) -> str:
    """An error answer's message (OpenAI's ``{"error": {"message": ...}}``, else its text), one line."""
    try:
        found = response.json()
        error = found.get("error") or found  # vLLM before 0.10 put the message at the top
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or response.text or response.reason_phrase).split())[:300]


def _seconds(retry_after: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (its HTTP-date form is not used by these servers)."""
    try:
        return max(0.0, float(retry_after)) if retry_after else None
    except ValueError:
        return None
