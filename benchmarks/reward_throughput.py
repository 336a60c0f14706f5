"""Texts per second of each reward backend on CPU, fully offline.

Detoxify, RewardModel and LocalJudge run on tiny random models in the real formats (built by
``rlhf_lit.testing``): the figures measure the backends' own overhead (tokenisation, batching,
post-processing), not the speed of the real BERT/RoBERTa-sized models. LLMJudge talks to a stub
chat-completions server on 127.0.0.1 that answers at once: its figure is the client's ceiling
(HTTP, JSON, thread pool), with the cache off.

Usage::

    python benchmarks/reward_throughput.py            # prints the table, updates docs/rewards.md
    python benchmarks/reward_throughput.py --no-write --n 128
    python benchmarks/reward_throughput.py --threads 1   # on a shared, busy CPU (see docs/rewards.md)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rlhf_lit.rewards import (  # noqa: E402
    Composite,
    Detoxify,
    LengthPenalty,
    LLMJudge,
    LocalJudge,
    Profanity,
    RewardModel,
)
from rlhf_lit.testing.chat_server import StubChatServer  # noqa: E402
from rlhf_lit.testing.models import (  # noqa: E402
    build_causal_lm,
    build_detoxify_checkpoint,
    build_sequence_classifier,
)

DOC = ROOT / "docs" / "rewards.md"
BEGIN, END = "<!-- throughput:begin -->", "<!-- throughput:end -->"

WORDS = (
    "the vote today was a great day for democracy but people are angry about the news and some of "
    "them think it is a bad idea to post this thread while others love it and reply with thanks"
).split()


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(10, 30))) for _ in range(n)]
    responses = [" ".join(rng.choices(WORDS, k=rng.randint(15, 45))) for _ in range(n)]
    return prompts, responses


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(backend, prompts, responses, min_seconds: float) -> float:
    backend(prompts[:4], responses[:4])  # warm-up (lazy loading happens here)
    runs, t0 = 0, time.perf_counter()
    while True:
        backend(prompts, responses)
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return runs * len(responses) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="texts per call")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="time each backend at least this long")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(ROOT)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts, responses = make_texts(args.n)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"
    rows = []
    with tempfile.TemporaryDirectory() as tmp, StubChatServer() as server:
        tmp = Path(tmp)
        ckpt, hf = build_detoxify_checkpoint(tmp / "detoxify")
        clf = build_sequence_classifier(tmp / "clf")
        lm = build_causal_lm(tmp / "lm")
        cases = [
            ("Profanity", "alt-profanity-check linear SVM (real model)", Profanity()),
            ("Detoxify", "tiny random BERT, batch 32", Detoxify(checkpoint=str(ckpt), huggingface_config_path=str(hf))),
            ("RewardModel", "tiny random BERT classifier, batch 16", RewardModel(str(clf), label=1, transform="sigmoid")),
            ("LocalJudge", "tiny random Llama, batch 8", LocalJudge(str(lm))),
            ("LLMJudge (parse)", "stub server, concurrency 8, no cache",
             LLMJudge(model="stub", base_url=server.base_url, cache=False)),
            ("LLMJudge (logprobs)", "stub server, concurrency 8, no cache",
             LLMJudge(model="stub", base_url=server.base_url, mode="logprobs", cache=False)),
            ("LengthPenalty", "words", LengthPenalty()),
            ("Composite", "Profanity + Detoxify + LengthPenalty",
             Composite([Profanity(), Detoxify(checkpoint=str(ckpt), huggingface_config_path=str(hf)), LengthPenalty()],
                       weights=[-1.0, -1.0, -0.01])),
        ]
        for name, what, backend in cases:
            backend.setup("cpu")
            rate = measure(backend, prompts, responses, args.min_seconds)
            rows.append((name, what, rate))
            print(f"{name:22s} {rate:12.1f} texts/s   ({what})", flush=True)

    stamp = datetime.date.today().isoformat()
    header = (
        f"Measured {stamp} on {cpu_name()} (torch threads: {torch.get_num_threads()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}; {args.n} texts per call "
        f"(responses of 15-45 words), `python benchmarks/reward_throughput.py"
        f"{' --threads ' + str(args.threads) if args.threads else ''}`; load average before the run: {load}.\n\n"
    )
    table = "| backend | setting | texts/s |\n|---|---|---:|\n" + "".join(
        f"| {n} | {w} | {r:,.0f} |\n" for n, w, r in rows
    )
    block = f"{BEGIN}\n{header}{table}{END}"
    print()
    print(header + table)
    if not args.no_write:
        text = DOC.read_text(encoding="utf-8") if DOC.exists() else f"# Reward backends\n\n{BEGIN}\n{END}\n"
        if BEGIN not in text or END not in text:
            text = text.rstrip() + f"\n\n## Throughput\n\n{BEGIN}\n{END}\n"
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        DOC.write_text(text, encoding="utf-8")
        print(f"updated {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
