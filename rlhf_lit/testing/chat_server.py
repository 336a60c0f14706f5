"""A stub OpenAI-compatible chat-completions server on 127.0.0.1, and the answers it sends.

For the tests and benchmarks of :class:`~rlhf_lit.rewards.LLMJudge`: a real HTTP server (so the
client's own networking, retries and thread pool run), standard library only.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional


def chat_completion(content: str, top_logprobs: Optional[dict[str, float]] = None, model: str = "stub") -> dict:
    """An OpenAI ``chat.completion`` object answering ``content``; with ``top_logprobs``
    (token -> probability) the first token gets ``logprobs.content[0].top_logprobs``."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
    }
    if top_logprobs is not None:
        cands = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in top_logprobs.items()]
        cands.sort(key=lambda c: -c["logprob"])
        first = cands[0]
        choice["logprobs"] = {
            "content": [{"token": first["token"], "logprob": first["logprob"], "bytes": first["bytes"], "top_logprobs": cands}]
        }
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
    }


def default_judge_behaviour(body: dict, n: int) -> tuple[int, Any]:
    """A deterministic judge: counts derived from the length of the user message; a bucket answer with
    top_logprobs when the request asks for logprobs."""
    user = body["messages"][-1]["content"]
    if body.get("logprobs"):
        k = 1 + len(user) % 5
        return 200, chat_completion(str(k), {str(k): 0.6, str(1 + (k % 5)): 0.3, "the": 0.1})
    return 200, chat_completion(json.dumps({"replies": len(user) % 7, "likes": len(user) % 13}))


class StubChatServer:
    """A real HTTP server on 127.0.0.1 (ephemeral port, daemon thread) speaking the chat-completions
    protocol, for tests and benchmarks of :class:`~rlhf_lit.rewards.LLMJudge`.

    ``behaviour(body, n)`` gets the parsed request body and the 1-based request number and returns
    ``(status, payload)``: a dict is sent as JSON, bytes/str as they are. It may sleep, or wait on
    :attr:`release` to hang until the server stops. Received requests are kept in :attr:`requests` as
    ``(headers, body)``; :attr:`max_in_flight` is the peak number of concurrent requests.

    Use as a context manager; :attr:`base_url` is ``http://127.0.0.1:<port>/v1``.
    """

    def __init__(self, behaviour: Optional[Callable[[dict, int], tuple[int, Any]]] = None) -> None:
        self.behaviour = behaviour or default_judge_behaviour
        self.requests: list[tuple[dict, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> "StubChatServer":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = {"_raw": raw.decode("utf-8", "replace")}
                    stub.requests.append((dict(self.headers.items()), body))
                    n = len(stub.requests)
                try:
                    if self.path.rstrip("/") != "/v1/chat/completions":
                        status, payload = 404, {"error": {"message": f"no route {self.path}"}}
                    else:
                        status, payload = stub.behaviour(body, n)
                    data = payload if isinstance(payload, bytes) else (
                        payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    )
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="stub-chat-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "StubChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port_url() -> str:
    """``http://127.0.0.1:<port>/v1`` for a port nothing listens on (for "server down" tests)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
