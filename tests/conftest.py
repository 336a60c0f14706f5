import json
import os
import socket

import pytest

# Tests never reach the network: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without a GPU the Triton decode kernels run through Triton's interpreter, which reads this
# variable when triton is first imported: before any test module imports it.
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


@pytest.fixture
def forbid_network(monkeypatch):
    """Hugging Face offline mode, and any socket connection or DNS lookup other than to the loopback
    interface raises ``OSError``: a test that would download something fails instead of passing on a
    machine that happens to be online."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        # huggingface_hub reads the variable once, at import: set the constant it already holds.
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


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Qwen2 base with its ChatML tokenizer, two SFT adapters (``sft``: LoRA only;
    ``sft_mts``: with an ``lm_head`` copy in ``modules_to_save``) and 16 prompts of different lengths,
    built once per test module. Returns the paths (str) and the ``root`` folder (Path)."""
    import torch
    from helpers import N_WORDS, build_tokenizer, tiny_qwen2, write_adapter

    root = tmp_path_factory.mktemp("wiring")
    torch.manual_seed(0)
    base = root / "base"
    tiny_qwen2().save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    write_adapter(base, root / "sft", seed=1)
    write_adapter(base, root / "sft_mts", seed=2, modules_to_save=["lm_head"])
    prompts = root / "prompts.jsonl"
    g = torch.Generator().manual_seed(0)
    with prompts.open("w") as f:
        for i in range(16):
            n = int(torch.randint(3, 9, (1,), generator=g))  # different lengths: left padding in batches
            words = " ".join(f"w{int(j)}" for j in torch.randint(4, N_WORDS, (n,), generator=g))
            f.write(json.dumps({"id": f"p{i}", "prompt": words, "split": "train"}) + "\n")
    return {"base": str(base), "sft": str(root / "sft"), "sft_mts": str(root / "sft_mts"), "prompts": str(prompts),
            "root": root}
