"""The algorithms as pure tensor maths: no models, no tokenizers, no Lightning.

Every function takes tensors and returns tensors, with its formula and shapes in the docstring.
Shapes use ``B`` for the batch (sequences), ``R`` for the response length (generated tokens,
right-padded after the stop token) and ``V`` for the vocabulary. Masks are ``(B, R)`` and true on
a response's real tokens (the stop token included, everything after it false).

One concept per file:

- ``masked.py``         masked sums, means, variances, whitening; explained variance
- ``logprobs.py``       log-probs and entropy from logits
- ``head_logprobs.py``  the same straight from hidden states, chunked over the vocabulary
- ``responses.py``      cutting sampled responses after their first stop token
- ``kl.py``             KL estimators (k1/k2/k3) and the adaptive KL controller
- ``reward_shaping.py`` score penalties and normalisation, the per-token KL-penalised rewards
- ``advantages.py``     advantage estimators, by name (``gae``, ...)
- ``losses.py``         per-token policy and value losses, by name
- ``aggregation.py``    how per-token losses become one number (``loss_agg_mode``)
- ``rollout_batch.py``  the ``Rollout`` and ``ResponseBatch`` containers
- ``rollout_metrics.py`` the metrics of one rollout, from its tensors

This package imports nothing from the rest of rlhf_lit (``tests/test_layout.py`` checks it).
References: Schulman et al. 2017 (PPO); Ziegler et al. 2019 (KL penalty, adaptive controller);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (the defaults);
Schulman 2020, "Approximating KL divergence" (k1/k2/k3).
"""
