"""Test kit: tiny, random, fully offline artefacts for the tests and the benchmarks.

Nothing here downloads anything: the tokenizers are built from vocabularies written on the spot,
the models are randomly initialised and the chat server runs on 127.0.0.1. What they exercise is
the package's real loading and scoring code; the scores they produce are meaningless.

* :mod:`rlhf_lit.testing.tokenizers`: the tiny tokenizers.
* :mod:`rlhf_lit.testing.models`: tiny random models and checkpoints in the real on-disk formats.
* :mod:`rlhf_lit.testing.chat_server`: a stub OpenAI-compatible chat-completions server.

Nothing is re-exported here: importing the chat server must not pull in torch or transformers.
"""
