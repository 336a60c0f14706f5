"""The containers that carry one iteration's experience between the loop's steps."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class ResponseBatch(NamedTuple):
    """Prompts and the responses sampled for them: what a model forward reads.

    Attributes:
        query_ids: ``(B, P)`` prompt token ids, left-padded.
        query_mask: ``(B, P)`` attention mask of the prompt (0 on left padding).
        response_ids: ``(B, R)`` sampled tokens, PAD after the first stop token.
        response_mask: ``(B, R)`` bool, true up to and including the first stop token.
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor

    def select(self, index: Tensor | slice) -> "ResponseBatch":
        """The rows ``index`` of every field."""
        return ResponseBatch(*(t[index] for t in self))


class Rollout(NamedTuple):
    """One PPO iteration's experience, everything detached.

    Attributes:
        query_ids, query_mask, response_ids: as in :class:`ResponseBatch`.
        response_mask: ``(B, R)`` bool, true up to and including the first stop token, and false
            on every token of a sample the reward could not score (it gets no update).
        logprobs: ``(B, R)`` log pi_old(a_t | s_t) with temperature-scaled logits, 0 where masked.
        ref_logprobs: ``(B, R)`` log pi_ref(a_t | s_t), same temperature, 0 where masked.
        values: ``(B, R)`` V_old(s_t) from the critic, 0 where masked (and without a critic).
        scores: ``(B,)`` the reward backend's score after shaping (penalties, normalisation).
        rewards: ``(B, R)`` per-token rewards: ``-beta * kl_t`` plus the score on the last token.
        advantages: ``(B, R)`` advantages (whitened over the batch when the estimator does).
        returns: ``(B, R)`` value targets ``A_t + V_t`` (before whitening).
        valid: ``(B,)`` bool, false for samples the reward could not score.
        group_index: ``(B,)`` long, the prompt each response answers (``samples_per_prompt`` share one).
        is_weights: ``(B, R)`` truncated importance weights of the sampler (1 without the correction).
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    valid: Tensor
    group_index: Tensor
    is_weights: Tensor

    def select(self, index: Tensor | slice) -> "Rollout":
        """The rows ``index`` of every field: a minibatch."""
        return Rollout(*(t[index] for t in self))

    @property
    def batch(self) -> ResponseBatch:
        """The prompts and responses, as a model forward reads them (only scored samples masked in)."""
        return ResponseBatch(self.query_ids, self.query_mask, self.response_ids, self.response_mask)
