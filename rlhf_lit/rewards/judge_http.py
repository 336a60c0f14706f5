"""The LLM judge's HTTP: httpx's async client, tenacity's retry policy, cancellation on Ctrl-C.

One batch of judge requests is one asyncio event loop: every request is a task, at most
``concurrency`` of them in flight. Why asyncio and not a thread pool: a task waiting on a socket can
be cancelled at once, a thread cannot. Ctrl-C (SIGINT) in the main thread cancels every request and
every retry sleep within milliseconds, and a second Ctrl-C interrupts even that (asyncio's runner).
A thread pool instead waits for each in-flight request to time out, retries included (241 s for
``timeout_s: 60, max_retries: 3``), both at shutdown and when the interpreter exits.

Standard behaviour of the client: redirects are not followed (the API key would be re-sent to
wherever they point); timeouts, connection errors, HTTP 408/429 and 5xx are retried with exponential
backoff and "equal jitter" (half the delay fixed, half uniform; AWS Architecture Blog, "Exponential
Backoff And Jitter", 2015), never longer than ``backoff_max_s``, and at least a server's
``Retry-After`` (capped the same way); other 4xx are not retried.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, TypeVar

import tenacity

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")


class HTTPFailure(Exception):
    """One failed attempt: ``status`` (None without an HTTP response), whether to retry, the server's
    ``Retry-After`` in seconds, and whether it was a timeout."""

    def __init__(self, message: str, status: Optional[int] = None, retryable: bool = False,
                 retry_after: Optional[float] = None, timeout: bool = False) -> None:
        super().__init__(message)
        self.status, self.retryable, self.retry_after, self.timeout = status, retryable, retry_after, timeout


@dataclass
class Outcome:
    """What the attempts at one request came to: the parsed value or the last failure, the number
    of retries, and the duration of each attempt that got an HTTP response (seconds)."""

    value: Any = None
    failure: Optional[HTTPFailure] = None
    attempts: int = 0
    retries: int = 0
    latencies: tuple[float, ...] = ()


def _retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare for APIs, and the backoff applies anyway


def _root_reason(exc: BaseException) -> str:
    """The innermost OS error of a transport failure (``Connection refused``), which httpx and anyio
    wrap in "All connection attempts failed"."""
    reason, seen, x = str(exc), set(), exc
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and (x.errno or x.strerror):
            reason = os.strerror(x.errno) if x.errno else x.strerror
        x = x.__cause__ or x.__context__
    return f"{type(exc).__name__}: {reason}"


async def post_json(client: httpx.AsyncClient, url: str, payload: bytes, headers: dict[str, str],
                    timeout_s: float) -> dict:
    """POST ``payload`` (JSON bytes) and return the response's JSON object.

    Raises:
        HTTPFailure: a timeout, a connection error, a redirect, an HTTP error status, or a body that
            is not a JSON object (``retryable`` says whether another attempt may help).
    """
    import httpx

    try:
        resp = await client.post(url, content=payload, headers=headers)
    except httpx.TimeoutException:
        raise HTTPFailure(f"timed out after {timeout_s:g} s", retryable=True, timeout=True) from None
    except httpx.TransportError as e:
        raise HTTPFailure(f"connection failed: {_root_reason(e)}", retryable=True) from None
    if resp.is_redirect:
        where = resp.headers.get("Location", "?")
        raise HTTPFailure(f"the server redirected (HTTP {resp.status_code}) to {where}; set base_url to the final "
                          f"address", status=resp.status_code)
    if resp.status_code >= 400:
        detail = resp.text[:300].strip()
        msg = f"HTTP {resp.status_code} {resp.reason_phrase}" + (f": {detail}" if detail else "")
        retryable = resp.status_code in (408, 429) or resp.status_code >= 500
        raise HTTPFailure(msg, resp.status_code, retryable, _retry_after(resp.headers.get("Retry-After")))
    try:
        data = json.loads(resp.content)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except ValueError:
        raise HTTPFailure(f"the response body is not a JSON object: {resp.content[:200].decode('utf-8', 'replace')!r}",
                          status=resp.status_code) from None


class _EqualJitter(tenacity.wait.wait_base):
    """``d = min(backoff_max, backoff * 2**retry)``, waiting ``d/2 + U(0, d/2)``, and at least the
    server's ``Retry-After`` (capped at ``backoff_max``)."""

    def __init__(self, backoff_s: float, backoff_max_s: float) -> None:
        half = tenacity.wait_exponential(multiplier=backoff_s / 2, max=backoff_max_s / 2)
        self.jittered = half + tenacity.wait_random_exponential(multiplier=backoff_s / 2, max=backoff_max_s / 2)
        self.backoff_max_s = backoff_max_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        delay = self.jittered(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, HTTPFailure) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.backoff_max_s))
        return delay


async def with_retries(attempt: Callable[[], Awaitable[T]], max_retries: int, backoff_s: float,
                       backoff_max_s: float) -> Outcome:
    """Run ``attempt`` until it returns, fails with a non-retryable :class:`HTTPFailure`, or
    ``max_retries`` retries are spent (tenacity's ``AsyncRetrying``; its sleeps are cancellable).
    Other exceptions propagate. ``Outcome.latencies`` holds the successful attempt's duration."""
    outcome = Outcome()

    async def timed() -> T:
        outcome.attempts += 1
        t0 = time.perf_counter()
        value = await attempt()
        outcome.latencies = (time.perf_counter() - t0,)
        return value

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(max_retries + 1),
        wait=_EqualJitter(backoff_s, backoff_max_s),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, HTTPFailure) and e.retryable),
        reraise=True,
    )
    try:
        outcome.value = await retrying(timed)
    except HTTPFailure as e:
        outcome.failure = e
    outcome.retries = max(0, outcome.attempts - 1)
    return outcome


def run_cancellable(make: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``make()`` to completion in an event loop of its own.

    In the main thread Ctrl-C cancels it (every task it awaits is cancelled in turn) and raises
    KeyboardInterrupt, a second Ctrl-C at once (asyncio's runner). Inside a running event loop (a
    notebook), it runs in a helper thread with its own loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1, thread_name_prefix="llm-judge-loop") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
