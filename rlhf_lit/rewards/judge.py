"""LLM judge of engagement behind an OpenAI-compatible HTTP server: :class:`LLMJudge`, and
:class:`JudgeError` for a sample it could not score.

This file is the backend: request bodies, the API key, the answer cache (in memory and optionally a
JSONL file) and scoring. The HTTP (httpx's async client, tenacity's retries with backoff, redirects
refused so the API key never leaves for another host, prompt cancellation on Ctrl-C) is in
``judge_http.py``. What the judge is asked and how an answer becomes a score (the templates, the ``parse``
JSON reading and the ``logprobs`` G-Eval expectation) are in ``judge_prompts.py``, shared with the
in-process :class:`~rlhf_lit.rewards.LocalJudge` (``local_judge.py``).

Caution: optimising posts against a simulated LLM audience raised engagement a little and
disinformation a lot (arXiv 2510.06105). Log samples so you see what is being rewarded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from rlhf_lit.errors import UserError

from .base import RewardBackend, RewardOutput
from .judge_http import HTTPFailure, Outcome, post_json, run_cancellable, with_retries
from .judge_prompts import (DEFAULT_BUCKET_TEMPLATE, DEFAULT_PARSE_TEMPLATE, DEFAULT_SYSTEM_PROMPT, bucket_expectation,
                            bucket_probs_from_logprobs, check_template, parse_engagement, render_template)

log = logging.getLogger(__name__)


class JudgeError(UserError, RuntimeError):
    """A judge could not score a sample (after retries, where retrying made sense)."""


class LLMJudge(RewardBackend):
    """Engagement predicted by an LLM behind an OpenAI-compatible ``POST {base_url}/chat/completions``
    (vLLM, llama.cpp server, Ollama, hosted APIs).

    ``mode: parse`` asks for ``{"replies": int, "likes": int}`` and scores
    ``w_replies * log1p(replies) + w_likes * log1p(likes)``; ``mode: logprobs`` asks for a bucket 1..K
    with ``logprobs: true`` and scores ``sum_k p(k) * k`` (G-Eval). Requests run concurrently
    (``concurrency`` in flight; ``judge_http.py``), are retried with exponential backoff and jitter on timeouts, connection errors,
    HTTP 408/429 and 5xx (never on other 4xx), and answers are cached per (prompt, response) and judge
    settings (model, mode, template, sampling), optionally in a JSONL file that persists across runs.
    Metrics per call: ``judge/failures``, ``judge/retries``, ``judge/latency_s`` (mean over the HTTP
    requests made; absent when all answers came from the cache), ``judge/cache_hits``. Components:
    ``<name>`` (the raw score) and, in parse mode, ``<name>/replies`` and ``<name>/likes``; entries of
    invalid samples are NaN.

    The API key is read from the environment variable named by ``api_key_env`` at each request and is
    never stored on the object, logged or put in error messages; redirects are refused so the key is
    never re-sent elsewhere.

    Args:
        model: Model name the server expects in the request (vLLM: the served model name).
        base_url: Server address up to the API version, e.g. ``http://127.0.0.1:8000/v1``;
            ``/chat/completions`` is appended.
        mode: ``parse`` (JSON replies/likes answer) or ``logprobs`` (G-Eval bucket expectation).
        prompt_template: User message with ``{prompt}``, ``{response}`` and ``{num_buckets}``
            placeholders (plain replacement: JSON braces need no escaping). None uses the default
            template of the mode (``DEFAULT_PARSE_TEMPLATE`` / ``DEFAULT_BUCKET_TEMPLATE``).
        system_prompt: System message; None uses ``DEFAULT_SYSTEM_PROMPT``, an empty string sends none.
        num_buckets: K, the number of buckets in logprobs mode (2..9, one digit each).
        w_replies: Weight of ``log1p(replies)`` in parse mode.
        w_likes: Weight of ``log1p(likes)`` in parse mode.
        api_key_env: Name of the environment variable holding the API key (sent as
            ``Authorization: Bearer ...``); None sends no key. The key itself is never stored.
        temperature: Sampling temperature of the judge.
        max_tokens: Answer length limit; None uses 64 in parse mode and 1 in logprobs mode.
        top_logprobs: Number of top alternatives requested per token in logprobs mode.
        response_format: ``json_object`` asks the server for JSON output (parse mode); ``none`` sends
            no response_format.
        extra_body: Extra fields merged into the request body, e.g.
            ``{chat_template_kwargs: {enable_thinking: false}}`` for vLLM.
        concurrency: Maximum number of requests in flight.
        timeout_s: Socket timeout of one request in seconds (connect, and each read).
        max_retries: Retries after the first attempt on retryable errors.
        backoff_s: First retry delay in seconds; doubles each retry, with jitter.
        backoff_max_s: Upper bound of one retry delay (also caps a server's Retry-After).
        cache: Keep answers in memory per (prompt, response) and reuse them.
        cache_path: JSONL file that persists the cache across runs (read at first use, appended to).
            Needs ``cache: true``.
        on_failure: ``raise`` stops with an error naming the URL, the HTTP status and the last error
            after retries; ``skip`` marks the sample invalid (left out of the PPO update) and counts it
            in ``judge/failures``.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` defaults to ``judge``.
    """

    default_name = "judge"

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        mode: Literal["parse", "logprobs"] = "parse",
        prompt_template: Optional[str] = None,
        system_prompt: Optional[str] = None,
        num_buckets: int = 5,
        w_replies: float = 1.0,
        w_likes: float = 1.0,
        api_key_env: Optional[str] = None,
        temperature: float = 0.0,
        max_tokens: Optional[int] = None,
        top_logprobs: int = 20,
        response_format: Literal["none", "json_object"] = "none",
        extra_body: Optional[dict] = None,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 20.0,
        cache: bool = True,
        cache_path: Optional[str] = None,
        on_failure: Literal["raise", "skip"] = "raise",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        who = f"LLMJudge {self.name!r}"
        if mode not in ("parse", "logprobs"):
            raise ValueError(f"{who}: mode must be 'parse' or 'logprobs', got {mode!r}")
        if on_failure not in ("raise", "skip"):
            raise ValueError(f"{who}: on_failure must be 'raise' or 'skip', got {on_failure!r}")
        if response_format not in ("none", "json_object"):
            raise ValueError(f"{who}: response_format must be 'none' or 'json_object', got {response_format!r}")
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"{who}: base_url must start with http:// or https://, got {base_url!r}")
        if not 2 <= int(num_buckets) <= 9:
            raise ValueError(f"{who}: num_buckets must be in 2..9 (one digit per bucket), got {num_buckets}")
        if int(concurrency) < 1 or int(max_retries) < 0 or float(timeout_s) <= 0:
            raise ValueError(
                f"{who}: need concurrency >= 1, max_retries >= 0 and timeout_s > 0, got "
                f"{concurrency}, {max_retries}, {timeout_s}"
            )
        if cache_path is not None and not cache:
            raise ValueError(f"{who}: cache_path={cache_path!r} needs cache: true")
        if api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(
                f"{who}: api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY), "
                f"not the key itself"
            )
        self.model = model
        self.base_url = str(base_url).rstrip("/")
        self.mode = mode
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.num_buckets = int(num_buckets)
        self.w_replies = float(w_replies)
        self.w_likes = float(w_likes)
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.top_logprobs = int(top_logprobs)
        self.response_format = response_format
        self.extra_body = dict(extra_body or {})
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.cache = bool(cache)
        self.cache_path = cache_path
        self.on_failure = on_failure
        check_template(self.template, who)
        self._init_runtime()

    # ------------------------------------------------------------------ config helpers
    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    @property
    def template(self) -> str:
        if self.prompt_template is not None:
            return self.prompt_template
        return DEFAULT_PARSE_TEMPLATE if self.mode == "parse" else DEFAULT_BUCKET_TEMPLATE

    @property
    def system(self) -> str:
        return DEFAULT_SYSTEM_PROMPT if self.system_prompt is None else self.system_prompt

    def _init_runtime(self) -> None:
        # Runtime state, rebuilt after unpickling (locks do not pickle).
        self._lock = threading.Lock()
        self._memory: dict[str, dict] = {}
        self._cache_loaded = False

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_memory", "_cache_loaded")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (
            f"LLMJudge(name={self.name!r}, model={self.model!r}, url={self.url!r}, mode={self.mode!r}, "
            f"api_key_env={self.api_key_env!r}, on_failure={self.on_failure!r})"
        )

    def request_body(self, prompt: str, response: str) -> dict:
        """The chat-completions request body for one (prompt, response) pair."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": render_template(self.template, prompt, response, self.num_buckets)})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens if self.max_tokens is not None else (64 if self.mode == "parse" else 1),
        }
        if self.mode == "logprobs":
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        if self.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        body.update(self.extra_body)
        return body

    def _cache_key(self, prompt: str, response: str) -> str:
        fingerprint = [
            self.model, self.mode, self.template, self.system, self.num_buckets, self.temperature,
            self.max_tokens, self.top_logprobs, self.response_format, self.extra_body,
        ]
        blob = json.dumps([fingerprint, prompt, response], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ cache file
    def _load_cache_file(self) -> None:
        if self._cache_loaded:
            return
        self._cache_loaded = True
        if not (self.cache and self.cache_path):
            return
        path = Path(self.cache_path).expanduser()
        if not path.exists():
            return
        bad = 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    self._memory[rec["key"]] = rec["value"]
                except (ValueError, KeyError, TypeError):
                    bad += 1
        if bad:
            log.warning("LLMJudge %r: skipped %d unreadable lines of cache file %s", self.name, bad, path)

    def _append_cache_file(self, entries: list[tuple[str, dict]]) -> None:
        if not (self.cache and self.cache_path and entries):
            return
        path = Path(self.cache_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for key, value in entries:
                f.write(json.dumps({"key": key, "value": value}) + "\n")

    # ------------------------------------------------------------------ HTTP
    def _api_key(self) -> Optional[str]:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(
                f"LLMJudge {self.name!r}: api_key_env is {self.api_key_env!r} but that environment variable is "
                f"not set or empty"
            )
        return key

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = "Bearer " + key
        return headers

    def _interpret(self, data: dict) -> dict:
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise HTTPFailure(f"unexpected response shape (no choices[0].message): {json.dumps(data)[:200]}",
                              status=200) from None
        try:
            if self.mode == "parse":
                replies, likes = parse_engagement(content)
                return {"replies": replies, "likes": likes}
            expected, probs = bucket_expectation(bucket_probs_from_logprobs(choice, self.num_buckets))
            return {"expected": expected, "probs": {str(k): v for k, v in probs.items()}}
        except ValueError as e:
            raise HTTPFailure(f"malformed judge answer ({e}): {content[:200]!r}", status=200) from None

    async def _judge_one(self, client, limit: asyncio.Semaphore, prompt: str, response: str) -> Outcome:
        """One sample, with retries; holds one of the ``concurrency`` slots per attempt, not while
        it sleeps before a retry."""
        payload = json.dumps(self.request_body(prompt, response)).encode("utf-8")
        headers = self._headers()

        async def attempt() -> dict:
            async with limit:
                data = await post_json(client, self.url, payload, headers, self.timeout_s)
            return self._interpret(data)

        return await with_retries(attempt, self.max_retries, self.backoff_s, self.backoff_max_s)

    def _failure_message(self, outcome: Outcome) -> str:
        last = outcome.failure
        status = "none (no HTTP response)" if last.status is None else str(last.status)
        msg = (f"LLMJudge {self.name!r}: POST {self.url} failed after {outcome.attempts} attempt(s); last status: "
               f"{status}; last error: {last}")
        if last.timeout:
            msg += " (raise timeout_s if the judge is only slow)"
        elif last.status is None:
            msg += f" (is the judge server running at {self.base_url}?)"
        return msg

    async def _judge_all(self, todo: dict[str, tuple[str, str]], results: dict[str, Outcome]) -> None:
        """Judge every ``key -> (prompt, response)`` of ``todo`` into ``results``; under
        ``on_failure: raise`` the first failure cancels the rest. Cancelling this coroutine (Ctrl-C)
        cancels every request and retry at once; ``results`` keeps what finished before."""
        # httpx is imported here, not at the top: importing it before Lightning makes typing's Union cache
        # hand Lightning's Trainer Union[float, int] annotations, and jsonargparse then reads
        # --trainer.limit_train_batches=1 as 1.0 (every batch) instead of one batch.
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits,
                                     follow_redirects=False) as client:
            limit = asyncio.Semaphore(self.concurrency)
            tasks = {asyncio.ensure_future(self._judge_one(client, limit, p, r)): key for key, (p, r) in todo.items()}
            pending = set(tasks)
            try:
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        results[tasks[task]] = task.result()
                    if self.on_failure == "raise" and any(o.failure for o in results.values()):
                        break
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ scoring
    def _value_to_score(self, value: dict) -> tuple[float, dict[str, float]]:
        if self.mode == "parse":
            r, l = float(value["replies"]), float(value["likes"])
            return self.w_replies * math.log1p(r) + self.w_likes * math.log1p(l), {"replies": r, "likes": l}
        return float(value["expected"]), {}

    def score(self, prompts: list[str], responses: list[str]) -> RewardOutput:
        n = len(responses)
        self._api_key()  # a missing key is a configuration error: say so before any request
        with self._lock:
            self._load_cache_file()
        keys = [self._cache_key(p, r) for p, r in zip(prompts, responses)]
        values: dict[str, dict] = {}
        hits = 0
        todo: dict[str, tuple[str, str]] = {}
        for key, p, r in zip(keys, prompts, responses):
            if key in values or key in todo:
                hits += 1  # a duplicate inside the batch is asked once
                continue
            with self._lock:
                cached = self._memory.get(key) if self.cache else None
            if cached is not None:
                values[key] = cached
                hits += 1
            else:
                todo[key] = (p, r)

        errors: dict[str, str] = {}
        retries, latencies = 0, []
        if todo:
            results: dict[str, Outcome] = {}
            try:
                run_cancellable(lambda: self._judge_all(todo, results))
            finally:  # also on Ctrl-C: the answers that came back are kept
                new_entries = [(k, o.value) for k, o in results.items() if o.failure is None]
                if self.cache and new_entries:
                    with self._lock:
                        self._memory.update(new_entries)
                        self._append_cache_file(new_entries)
            for key, outcome in results.items():
                retries += outcome.retries
                latencies += outcome.latencies
                if outcome.failure is None:
                    values[key] = outcome.value
                else:
                    errors[key] = self._failure_message(outcome)
        if errors and self.on_failure == "raise":
            first = next(iter(errors.values()))
            more = f" ({len(errors)} samples failed)" if len(errors) > 1 else ""
            raise JudgeError(first + more + ". Set on_failure: skip to leave such samples out instead.")

        scores = torch.full((n,), float("nan"))
        valid = torch.zeros(n, dtype=torch.bool)
        extra = {"replies": torch.full((n,), float("nan")), "likes": torch.full((n,), float("nan"))}
        for i, key in enumerate(keys):
            if key in values:
                s, parts = self._value_to_score(values[key])
                scores[i], valid[i] = s, True
                for part, v in parts.items():
                    extra[part][i] = v
        components = {self.name: scores.clone()}
        if self.mode == "parse":
            components[f"{self.name}/replies"] = extra["replies"]
            components[f"{self.name}/likes"] = extra["likes"]
        n_fail = sum(1 for k in keys if k not in values)
        if n_fail:
            log.warning("LLMJudge %r: %d of %d samples failed and are marked invalid: %s", self.name, n_fail, n, next(iter(errors.values())))
        metrics = {"judge/failures": float(n_fail), "judge/retries": float(retries), "judge/cache_hits": float(hits)}
        if latencies:
            metrics["judge/latency_s"] = sum(latencies) / len(latencies)
        return RewardOutput(torch.where(valid, scores, 0.0), valid, components, metrics)
