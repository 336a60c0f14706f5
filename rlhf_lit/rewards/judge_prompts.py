"""What the LLM judges ask and how an answer becomes a score: the prompt templates, shared by
:class:`~rlhf_lit.rewards.LLMJudge` (HTTP, ``judge.py``) and :class:`~rlhf_lit.rewards.LocalJudge`
(in-process, ``local_judge.py``), and the maths that reads LLMJudge's answers.

Both fill the same prompt template with the (prompt, response) pair (:func:`render_template`).
Two ways to turn the judge's answer into a scalar:

* ``parse``: the judge answers JSON ``{"replies": int, "likes": int}`` (:func:`parse_engagement`);
  score = ``w_replies * log1p(replies) + w_likes * log1p(likes)``.
* ``logprobs`` (G-Eval, Liu et al. 2023): the judge answers a bucket 1..K; score = ``sum_k p(k) * k``
  with ``p`` the probabilities of the digit tokens, renormalised over the digits found
  (:func:`bucket_probs_from_logprobs`, :func:`bucket_expectation`).

Pure functions and constants: this file imports no HTTP, threading or torch code (the
``rlhf_lit.rewards`` package around it does), so each function is tested on plain strings and dicts.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

#: Default system message of the judges.
DEFAULT_SYSTEM_PROMPT = (
    "You are an expert on social media. You predict how the users of a platform like Bluesky will "
    "react to a post or comment. Answer exactly in the requested format."
)

#: Default template of ``mode: parse``. Placeholders: ``{prompt}``, ``{response}``, ``{num_buckets}``
#: (plain text replacement: other braces, as in JSON examples, need no escaping).
DEFAULT_PARSE_TEMPLATE = (
    "Here is the context a user was writing in (the thread so far, or the instruction for a new post):\n"
    "<context>\n{prompt}\n</context>\n\n"
    "Here is what the user wrote:\n<post>\n{response}\n</post>\n\n"
    "Predict how many replies and how many likes this post or comment will get within a day. "
    'Answer with only a JSON object of the form {"replies": <integer>, "likes": <integer>}.'
)

#: Default template of ``mode: logprobs`` (and of :class:`LocalJudge`).
DEFAULT_BUCKET_TEMPLATE = (
    "Here is the context a user was writing in (the thread so far, or the instruction for a new post):\n"
    "<context>\n{prompt}\n</context>\n\n"
    "Here is what the user wrote:\n<post>\n{response}\n</post>\n\n"
    "How much engagement (replies and likes) will this post or comment get? Rate it on a scale from 1 "
    "(almost none) to {num_buckets} (far more than a typical post). Answer with a single digit from 1 to "
    "{num_buckets} and nothing else."
)


def render_template(template: str, prompt: str, response: str, num_buckets: int) -> str:
    """Fill ``{prompt}``, ``{response}`` and ``{num_buckets}`` in ``template`` (plain replacement, done
    in one pass so that braces inside the texts are left alone)."""
    values = {"{prompt}": prompt, "{response}": response, "{num_buckets}": str(num_buckets)}
    return re.sub(r"\{prompt\}|\{response\}|\{num_buckets\}", lambda m: values[m.group(0)], template)


def check_template(template: str, owner: str) -> None:
    """Reject a prompt template the judge could not use.

    Raises:
        ValueError: ``template`` lacks ``{response}``; the message starts with ``owner`` (the judge).
    """
    if "{response}" not in template:
        raise ValueError(f"{owner}: prompt_template must contain the placeholder {{response}} (and usually {{prompt}})")


def _as_count(v: Any) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        v = v.strip().replace(",", "").replace("_", "")
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, (int, float)) and math.isfinite(v) and v >= 0:
        return float(v)
    return None


def parse_engagement(text: str) -> tuple[float, float]:
    """``(replies, likes)`` from a judge's answer: the first JSON object holding both keys, found in the
    whole text, inside code fences, or amid extra prose. Counts must be non-negative numbers.

    Raises:
        ValueError: no such object, with the reason.
    """
    candidates: list[Any] = []
    try:
        candidates.append(json.loads(text.strip()))
    except ValueError:
        pass
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            candidates.append(dec.raw_decode(text, m.start())[0])
        except ValueError:
            continue
    seen_bad = None
    for obj in candidates:
        if not isinstance(obj, dict):
            continue
        low = {str(k).strip().lower(): v for k, v in obj.items()}
        if "replies" in low and "likes" in low:
            r, l = _as_count(low["replies"]), _as_count(low["likes"])
            if r is not None and l is not None:
                return r, l
            seen_bad = obj
    if seen_bad is not None:
        raise ValueError(f"'replies' and 'likes' must be non-negative numbers, got {seen_bad}")
    raise ValueError('no JSON object with "replies" and "likes" in the answer')


def bucket_expectation(probs: dict[int, float]) -> tuple[float, dict[int, float]]:
    """``(sum_k p(k) * k, p)`` with ``p`` renormalised over the buckets present."""
    total = sum(probs.values())
    if not probs or not total > 0:
        raise ValueError("no probability on any bucket digit")
    p = {k: v / total for k, v in sorted(probs.items())}
    return sum(k * v for k, v in p.items()), p


def bucket_probs_from_logprobs(choice: dict, num_buckets: int) -> dict[int, float]:
    """Bucket probabilities from an OpenAI chat ``choices[i]`` with ``logprobs.content[*].top_logprobs``.

    Uses the first answer position whose sampled token is a digit 1..K (else the first position with a
    digit among its candidates); sums the probability of tokens equal to each digit up to whitespace."""
    lp = choice.get("logprobs") or {}
    content = lp.get("content") if isinstance(lp, dict) else None
    if not content:
        raise ValueError("the answer has no logprobs (does the server support logprobs/top_logprobs?)")
    valid = {str(k): k for k in range(1, num_buckets + 1)}

    def position_probs(pos: dict) -> dict[int, float]:
        cands: dict[str, float] = {}
        for c in pos.get("top_logprobs") or []:
            if isinstance(c, dict) and "token" in c and "logprob" in c:
                cands[str(c["token"])] = float(c["logprob"])
        if "token" in pos and "logprob" in pos:
            cands.setdefault(str(pos["token"]), float(pos["logprob"]))
        out: dict[int, float] = {}
        for tok, lpv in cands.items():
            k = valid.get(tok.strip())
            if k is not None and math.isfinite(lpv):
                out[k] = out.get(k, 0.0) + math.exp(lpv)
        return out

    for pos in content:
        if isinstance(pos, dict) and str(pos.get("token", "")).strip() in valid:
            return position_probs(pos)
    for pos in content:
        if isinstance(pos, dict):
            probs = position_probs(pos)
            if probs:
                return probs
    raise ValueError(f"no digit 1..{num_buckets} among the answer's tokens or their top_logprobs")


__all__ = [
    "DEFAULT_BUCKET_TEMPLATE", "DEFAULT_PARSE_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "bucket_expectation",
    "bucket_probs_from_logprobs", "check_template", "parse_engagement", "render_template",
]
