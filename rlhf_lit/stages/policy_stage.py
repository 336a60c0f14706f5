"""A stage that trains the policy adapter and can sample from it: rewards, rollouts, evaluation.

Shared by the stages whose product is a policy adapter (PPO; later DPO): the reward backend (and
eval-only backends), the rollout engine and stop tokens, sampling with either adapter, validation
(held-out score and KL each epoch), ``test`` (both adapters answer the same prompts with the same
seeds; the report compares them, :mod:`rlhf_lit.evaluation`) and ``predict`` (the policy adapter's
responses as JSONL, :mod:`rlhf_lit.predictions`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rlhf_lit.algos.kl import kl_estimate
from rlhf_lit.algos.masked import masked_mean
from rlhf_lit.algos.responses import TruncatedResponse, truncate_after_stop
from rlhf_lit.algos.rollout_batch import ResponseBatch
from rlhf_lit.evaluation import TestEvaluator, check_eval_rewards
from rlhf_lit.evaluation.stats import distinct_n
from rlhf_lit.model import POLICY, REFERENCE, PolicyConfig
from rlhf_lit.predictions import prediction_rows, write_predictions
from rlhf_lit.rewards.base import RewardBackend
from rlhf_lit.rollout import KernelsName, RolloutEngine, SamplingConfig, make_engine
from rlhf_lit.rollout.auto import check_kernels
from rlhf_lit.stages.base import AdapterStage, default_optimizer
from rlhf_lit.tokenizer import resolve_stop_tokens


class PolicyStage(AdapterStage):
    """Base class of the stages that train the policy adapter (see the module docstring).

    Args:
        policy: Base model, SFT adapter and loading options.
        reward: The reward backend (``class_path``/``init_args``); default: the offline profanity classifier.
        sampling: Rollout sampling (temperature, top-k/p, lengths).
        eval_sampling: Sampling for validation and test; defaults to ``sampling``.
        rollout_engine: ``hf`` (transformers generate), ``cuda_graph`` (static cache + CUDA graph), or
            ``auto`` (cuda_graph on a GPU when supported, else hf); ``cuda_graph_merged``: cuda_graph
            decoding with the policy LoRA merged into a copy of each bf16 weight, recomputed every
            rollout and freed after it (no LoRA GEMMs per token; ~13 GB more during rollouts on a 7B
            model).
        rollout_kernels: The cuda_graph engines' decode-step glue (norms, RoPE, attention, SiLU,
            and sampling without top-k/top-p): ``triton`` kernels, ``torch`` ops, or ``auto`` (Triton
            where it imports and its kernels pass a self-test on the GPU, else torch ops). With
            ``rollout_engine: hf`` only ``auto`` (an error otherwise); ignored, with a warning, where
            ``auto`` samples with HF generate (the CPU).
        optimizer: Optimizer over the trained weights.
        lr_scheduler: Optional scheduler.
        output_dir: Where the trained policy adapter is exported (PEFT folder); default ``<log dir>/adapter``.
        eval_samples_per_prompt: Responses sampled per test prompt and adapter.
        eval_rewards: Extra reward backends that only score test samples (each ``class_path``/``init_args``,
            distinct ``name``s), reported beside the configured reward; never used for training.
        extra_stop_tokens: Tokens that end a response besides the tokenizer's EOS, by name (``<|im_end|>``)
            or as the text of one token (``"\\n\\n"``); checked at startup. Not the PAD token.
        seed: Seed of sampling (each data-parallel rank adds its rank).
    """

    #: How the test report labels ``model.reward`` (DPO does not train on it).
    reward_role = "trained-on reward"

    def __init__(
        self,
        policy: PolicyConfig,
        reward: Optional[RewardBackend] = None,
        sampling: SamplingConfig = SamplingConfig(),
        eval_sampling: Optional[SamplingConfig] = None,
        rollout_engine: Literal["auto", "hf", "cuda_graph", "cuda_graph_merged"] = "auto",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        output_dir: Optional[str] = None,
        eval_samples_per_prompt: int = 1,
        eval_rewards: Optional[list[RewardBackend]] = None,
        extra_stop_tokens: Optional[list[str]] = None,
        seed: int = 0,
        rollout_kernels: KernelsName = "auto",
    ) -> None:
        super().__init__(policy, optimizer, lr_scheduler, output_dir, seed)
        self.sampling = sampling
        self.eval_sampling = eval_sampling or sampling
        if reward is None:
            from rlhf_lit.rewards.profanity import Profanity

            reward = Profanity()
        self.reward = reward
        check_kernels(rollout_engine, rollout_kernels)  # a config mistake: before any weights load
        self.rollout_engine_name = rollout_engine
        self.rollout_kernels = rollout_kernels
        self.eval_samples_per_prompt = eval_samples_per_prompt
        self.eval_rewards = check_eval_rewards(eval_rewards)
        self.extra_stop_tokens = list(extra_stop_tokens or [])
        self.engine: Optional[RolloutEngine] = None
        self._stop_token_ids: Optional[list[int]] = None

    def setup_components(self, device: torch.device) -> None:
        self.reward.setup(device)
        for backend in self.eval_rewards:
            backend.setup(device)
        self.engine = make_engine(self.rollout_engine_name, device, self.rollout_kernels)

    def check_tokenizer(self, tokenizer) -> None:
        self._stop_token_ids = resolve_stop_tokens(tokenizer, self.extra_stop_tokens)

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS and ``extra_stop_tokens`` as ids (resolved once, at setup: :func:`resolve_stop_tokens`)."""
        if getattr(self, "_stop_token_ids", None) is None:
            self._stop_token_ids = resolve_stop_tokens(self.tokenizer, self.extra_stop_tokens)
        return self._stop_token_ids

    def eval_micro_batch(self, rows: int) -> int:
        """Rows per no-grad forward when scoring ``rows`` samples (the training micro-batch)."""
        return rows

    # ---------------------------------------------------------------------------------------
    # Sampling
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: dict[str, Any], sampling: SamplingConfig,
               role: str = POLICY) -> tuple[TruncatedResponse, list[str]]:
        """Sample responses with ``role``'s adapter; returns them cut after the first stop token,
        and their text."""
        self.model.eval()
        with self.model.role(role):
            tokens = self.engine.generate(self.model.peft, batch["input_ids"], batch["attention_mask"], sampling,
                                          self.stop_token_ids, self.tokenizer.pad_token_id)
        responses = truncate_after_stop(tokens, self.stop_token_ids, self.tokenizer.pad_token_id)
        return responses, self.decode(responses)

    def decode(self, responses: TruncatedResponse) -> list[str]:
        """Response text without the stop token and padding: what the reward reads."""
        stops = torch.tensor(self.stop_token_ids, device=responses.response_ids.device)
        body = responses.response_mask & ~torch.isin(responses.response_ids, stops)
        return [
            self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
            for row, m in zip(responses.response_ids, body)
        ]

    # ---------------------------------------------------------------------------------------
    # Validation and test
    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_rng(self, batch_idx: int):
        """Evaluation samples with its own seed and leaves the training RNG stream untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 7919 * (batch_idx + 1) + self.global_rank)
            yield

    @torch.no_grad()
    def _score_and_kl(self, batch, role: str, extra: bool = False) -> dict[str, Any]:
        """Sample with ``role``'s adapter and score; ``extra`` adds the eval-only backends' outputs."""
        responses, texts = self.sample(batch, self.eval_sampling, role)
        out = self.reward(batch["prompt"], texts)
        q_ids, T = batch["input_ids"], self.eval_sampling.temperature
        # KL of the sampling adapter to the reference, estimated on its own samples (0 for the reference).
        if role == REFERENCE:
            kl = torch.zeros(q_ids.shape[0], device=q_ids.device)
        else:
            sampled = ResponseBatch(q_ids, batch["attention_mask"], responses.response_ids, responses.response_mask)
            micro = self.eval_micro_batch(q_ids.shape[0])
            own = self.model.evaluate(sampled, T, role, micro, values=False)
            ref = self.model.evaluate(sampled, T, REFERENCE, micro)
            kl = (kl_estimate(own.logprobs, ref.logprobs, "k1") * responses.response_mask).sum(-1)
        r = {"scores": out.scores.to(self.device), "valid": out.valid.to(self.device), "kl": kl,
             "length": responses.response_mask.sum(-1).float(), "eos": responses.has_stop.float(), "texts": texts,
             "components": out.components}
        if extra:
            r["eval"] = {b.name: b(batch["prompt"], texts) for b in self.eval_rewards}
        return r

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with self._eval_rng(batch_idx):
            r = self._score_and_kl(batch, POLICY)
        self.engine.release()
        n = len(batch["prompt"])
        sync = self.trainer.world_size > 1
        self.log("validation/score", masked_mean(r["scores"], r["valid"]), batch_size=n, sync_dist=sync)
        self.log("validation/kl", r["kl"].mean(), batch_size=n, sync_dist=sync)
        self.log("validation/length", r["length"].mean(), batch_size=n, sync_dist=sync)
        self.log("validation/distinct_2", distinct_n(r["texts"], 2), batch_size=n, sync_dist=sync)

    def on_test_epoch_start(self) -> None:
        # Metrics and report: rlhf_lit/evaluation (torchmetrics states, synced across ranks).
        self._evaluator = TestEvaluator(f"{self.reward.name} ({self.reward_role})", self.device, seed=self.seed)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for k in range(self.eval_samples_per_prompt):
            results = {}
            for role, name in ((POLICY, "rlhf"), (REFERENCE, "sft")):
                with self._eval_rng(batch_idx * 1000 + k):  # same seed for both adapters: paired samples
                    results[name] = self._score_and_kl(batch, role, extra=True)
            self.engine.release()
            self._evaluator.update(batch["id"], batch["prompt"], results, sample=k)

    def on_predict_epoch_start(self) -> None:
        self._predictions: list[dict[str, Any]] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Responses of the policy adapter to ``batch``'s prompts: the rows of ``predictions.jsonl``
        (:mod:`rlhf_lit.predictions`), which ``trainer.predict`` also returns."""
        cfg = self.policy_config
        adapter = self.trainer.ckpt_path or cfg.policy_adapter or f"{cfg.sft_adapter} (the SFT adapter)"
        rows = []
        for k in range(self.eval_samples_per_prompt):
            with self._eval_rng(batch_idx * 1000 + k):
                _, texts = self.sample(batch, self.eval_sampling)
            out = self.reward(batch["prompt"], texts)
            rows += prediction_rows(batch["id"], batch["prompt"], texts, out.scores, out.valid, k, str(adapter))
        self.engine.release()
        self._predictions += rows
        return rows

    def on_predict_epoch_end(self) -> None:
        self.predictions_path = write_predictions(self.trainer, self._predictions)

    def on_test_epoch_end(self) -> None:
        # Every rank computes (a collective); rank 0 writes report.md/json, the histogram, test_samples.jsonl.
        headline = self._evaluator.finish(self)
        self.log_dict(headline, sync_dist=self.trainer.world_size > 1)
