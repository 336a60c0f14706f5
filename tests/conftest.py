import os
import socket

import pytest

# Tests never reach the network: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
