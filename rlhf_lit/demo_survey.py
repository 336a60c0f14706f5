"""A synthetic moderator survey for the offline preference demo (DPO and the reward model).

Shaped like the research group's Reddit moderator survey in its "ratings" layout: one row per
(thread, comment, moderator, rating 1-5). The threads and comments come from the demo's template
grammar (:func:`rlhf_lit.demo_assets.demo_grammar`), in the voices the demo model knows (the
cluster-13 persona's lowercase snark and ordinary users); the signal is civility: the moderators
rate civil comments high and rude ones (insults, profanity) low, each with a personal bias and
noise, so some pairs are close and a few are inverted.

``scripts/build_demo_pairs.py`` writes these rows as a CSV and turns them into
``prompts/demo_pairs.jsonl`` with ``scripts/build_preference_pairs.py``, the same converter the
real survey goes through. Deterministic (seeded): the shipped file is reproducible.
"""

from __future__ import annotations

import random

from rlhf_lit.demo_assets import demo_grammar

SEED = 1616
N_THREADS = 160
CIVIL_PER_THREAD, RUDE_PER_THREAD = 2, 2
RATERS = {"mod_1": -0.3, "mod_2": 0.0, "mod_3": 0.3}  #: moderator -> personal bias
MEAN_RATING = {"civil": 4.0, "rude": 1.9}
RATING_NOISE = 0.8
PERSONA_FRAC = 0.5  #: share of comments in the persona's voice
COLUMNS = ("thread", "comment", "rater", "rating")


def demo_survey_rows(seed: int = SEED, n_threads: int = N_THREADS) -> list[dict[str, object]]:
    """The survey: ``n_threads`` threads x (civil + rude comments) x every moderator, as dicts
    with :data:`COLUMNS` (``rating`` an int in 1..5)."""
    g = demo_grammar()
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    threads: set[str] = set()
    while len(threads) < n_threads:
        topic, thread = g.opener(rng)
        if thread in threads:
            continue
        threads.add(thread)
        comments: dict[str, str] = {}
        for kind, n in (("civil", CIVIL_PER_THREAD), ("rude", RUDE_PER_THREAD)):
            made = 0
            while made < n:
                text = g.reply(rng, topic, persona=rng.random() < PERSONA_FRAC, rude=kind == "rude")
                if text not in comments:
                    comments[text] = kind
                    made += 1
        for text, kind in comments.items():
            for rater, bias in RATERS.items():
                rating = round(MEAN_RATING[kind] + bias + rng.gauss(0.0, RATING_NOISE))
                rows.append({"thread": thread, "comment": text, "rater": rater, "rating": min(max(rating, 1), 5)})
    return rows


__all__ = ["COLUMNS", "demo_survey_rows"]
