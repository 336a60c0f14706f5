"""Tiny, random, fully offline artefacts for tests and benchmarks of the reward backends.

Nothing here downloads anything: the tokenizers are built from vocabularies written on the spot and
the models are randomly initialised. The scores they produce are meaningless; what they exercise is
the real loading and scoring code (Detoxify's checkpoint format, ``AutoModelForSequenceClassification``
folders, causal-LM judges).
"""

from __future__ import annotations

import json
import math
import string
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

#: Class names of Detoxify's ``original`` model, as stored in its checkpoints (Detoxify renames
#: ``toxic``, ``severe_toxic`` and ``identity_hate`` when it loads them).
DETOXIFY_ORIGINAL_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]

_WORDS = (
    "the a an and or but not no yes is are was were be to of in on at for with you your i we they "
    "he she it this that what why how who good bad nice great love hate stupid idiot kill post reply "
    "like thread people vote news today day new hello world thanks please"
).split()


def write_wordpiece_vocab(path: Union[str, Path]) -> Path:
    """Write a small WordPiece ``vocab.txt`` (BERT special tokens, single characters, ``##`` pieces
    and a few whole words) that can spell any lower-case ASCII text."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += chars + ["##" + c for c in string.ascii_lowercase + string.digits] + _WORDS
    seen: dict[str, None] = dict.fromkeys(tokens)
    path = Path(path)
    path.write_text("\n".join(seen) + "\n", encoding="utf-8")
    return path


def build_bert_tokenizer(folder: Union[str, Path]):
    """A lower-casing BERT WordPiece tokenizer built from :func:`write_wordpiece_vocab`, saved in
    ``folder`` and returned. ``model_max_length`` is 64."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_wordpiece_vocab(folder / "vocab.txt")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=64)
    tok.save_pretrained(folder)
    return tok


def _tiny_bert_config(vocab_size: int, num_labels: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
        **extra,
    )


def build_detoxify_checkpoint(
    folder: Union[str, Path],
    classes: Sequence[str] = tuple(DETOXIFY_ORIGINAL_CLASSES),
    seed: int = 0,
) -> tuple[Path, Path]:
    """Build a tiny random BERT toxicity classifier in Detoxify's own checkpoint format.

    Writes ``folder/hf`` (``config.json`` and tokenizer files: what Detoxify's
    ``huggingface_config_path`` expects) and ``folder/tiny-detoxify.ckpt``: a ``torch.save`` dict with
    ``config`` (``arch.args``: ``model_type``, ``model_name``, ``tokenizer_name``, ``num_classes``;
    ``dataset.args.classes``) and ``state_dict`` (the ``transformers`` model's own keys), as in the
    checkpoints Detoxify publishes. ``model_type`` is ``bert-base-uncased`` as in the real
    ``original`` checkpoint, so loading it offline needs the local-folder handling of
    :class:`rlhf_lit.rewards.Detoxify`.

    Returns:
        ``(checkpoint_path, huggingface_config_path)``.
    """
    from transformers import BertForSequenceClassification

    folder = Path(folder)
    hf = folder / "hf"
    tok = build_bert_tokenizer(hf)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_tiny_bert_config(len(tok), len(classes))).eval()
    model.config.save_pretrained(hf)
    ckpt = folder / "tiny-detoxify.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "type": "ToxicClassifier",
                    "args": {
                        "model_type": "bert-base-uncased",
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizer",
                        "num_classes": len(classes),
                    },
                },
                "dataset": {"type": "JigsawDataOriginal", "args": {"classes": list(classes)}},
            },
            "state_dict": model.state_dict(),
        },
        ckpt,
    )
    return ckpt, hf


def build_sequence_classifier(
    folder: Union[str, Path],
    labels: Sequence[str] = ("negative", "positive"),
    seed: int = 0,
) -> Path:
    """Save a tiny random ``BertForSequenceClassification`` (``id2label`` from ``labels``) and its
    tokenizer with ``save_pretrained`` into ``folder``; returns the folder."""
    from transformers import BertForSequenceClassification

    folder = Path(folder)
    tok = build_bert_tokenizer(folder)
    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    cfg = _tiny_bert_config(len(tok), len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    BertForSequenceClassification(cfg).eval().save_pretrained(folder)
    return folder


#: A minimal ChatML template for the tiny causal LM (enough to exercise ``apply_chat_template``).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_causal_lm(folder: Union[str, Path], seed: int = 0, chat_template: bool = True) -> Path:
    """Save a tiny random Llama causal LM and a word-level tokenizer (every digit is one token, no
    post-processor, ``<|im_start|>``/``<|im_end|>`` specials, optional ChatML template) into
    ``folder``; returns the folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab_list = specials + list(string.ascii_lowercase + string.digits + string.punctuation) + _WORDS
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=256,
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- network guard
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


def forbid_network(monkeypatch) -> None:
    """Test helper: Hugging Face offline mode, and any socket connection or DNS lookup other than to
    the loopback interface raises ``OSError``. ``monkeypatch`` is pytest's fixture."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    except ImportError:  # pragma: no cover
        pass

    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and str(address[0]) not in _LOCAL_HOSTS:
            raise OSError(f"network access is disabled in this test (connect to {address!r})")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        h = host.decode() if isinstance(host, bytes) else str(host)
        if host is not None and h not in _LOCAL_HOSTS:
            raise OSError(f"network access is disabled in this test (DNS lookup of {h!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# --------------------------------------------------------------------------- chat-completions stub
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
