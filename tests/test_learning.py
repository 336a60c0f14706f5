"""PPO learns: the classic silent bugs are absent and a seeded run moves the score."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from rlhf_lit.data import PromptDataModule
from rlhf_lit.stages import PPOConfig, PPOModule
from rlhf_lit.model import POLICY, PolicyConfig
from rlhf_lit.rewards import RewardBackend
from rlhf_lit.rollout import SamplingConfig

PROMPTS = str(Path(__file__).resolve().parents[1] / "prompts" / "demo_prompts.jsonl")


class BrevityReward(RewardBackend):
    """A synthetic reward the tiny SFT model can learn quickly: 1 for an empty reply, 0 at 12 words."""

    default_name = "brevity"

    def score(self, prompts, responses):
        return [max(0.0, 1.0 - len(r.split()) / 12) for r in responses]


class Record(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({k: float(m[k]) for k in ("objective/scores", "objective/kl")})


def train(kl_coef: float, rollouts: int = 12, seed: int = 0, lr: float = 1.5e-3, batch_size: int = 8,
          critic: str = "value_head", reward: RewardBackend = None, **ppo):
    torch.manual_seed(seed)
    module = PPOModule(
        policy=PolicyConfig(critic=critic),
        reward=reward or BrevityReward(),
        ppo=PPOConfig(**{"ppo_epochs": 4, "num_minibatches": 2, "kl_coef": kl_coef, **ppo}),
        sampling=SamplingConfig(max_new_tokens=16, temperature=1.0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, eps=1e-5),
        rollout_batch_size=batch_size,
        log_samples=0,
        seed=seed,
    )
    data = PromptDataModule(prompt_file=PROMPTS, batch_size=batch_size, tokenizer="builtin:demo", seed=seed)
    rec = Record()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=rollouts, limit_val_batches=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[rec])
    trainer.fit(module, data)
    return module, data, rec.rows


def test_rollout_logprobs_equal_generate_logits():
    """The log-probs PPO records (a fresh forward over prompt + response, left padding) equal the
    temperature-scaled log-softmax of the logits `generate` sampled from, token for token."""
    from transformers import GenerationConfig

    module, data, _ = train(kl_coef=0.05, rollouts=1)
    model, tok = module.model.eval(), module.tokenizer
    batch = next(iter(data.train_dataloader()))
    assert (batch["attention_mask"] == 0).any(), "the batch should exercise left padding"
    T = 0.7
    cfg = GenerationConfig(do_sample=True, temperature=T, top_k=0, top_p=1.0, max_new_tokens=12,
                           eos_token_id=module.stop_token_ids, pad_token_id=tok.pad_token_id,
                           output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), model.role(POLICY):
        out = model.peft.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  generation_config=cfg)
        from rlhf_lit.algos.responses import truncate_after_stop
        from rlhf_lit.algos.rollout_batch import ResponseBatch

        trunc = truncate_after_stop(out.sequences[:, batch["input_ids"].shape[1]:], module.stop_token_ids,
                                        tok.pad_token_id)
        gen_logits = torch.stack(out.logits, 1)
        expected = torch.log_softmax(gen_logits.float() / T, -1).gather(-1, trunc.response_ids.unsqueeze(-1)).squeeze(-1)
        sampled = ResponseBatch(batch["input_ids"], batch["attention_mask"], trunc.response_ids, trunc.response_mask)
        recorded = model(sampled, T).logprobs
    m = trunc.response_mask
    torch.testing.assert_close(recorded[m], expected[m], atol=1e-5, rtol=1e-5)


def test_ppo_raises_the_score_and_the_kl_coefficient_holds_the_policy_back():
    _, _, free = train(kl_coef=0.01)
    _, _, held = train(kl_coef=1.0)
    start = sum(r["objective/scores"] for r in free[:3]) / 3
    end = sum(r["objective/scores"] for r in free[-3:]) / 3
    print(f"\nbrevity score: first 3 rollouts {start:.3f} -> last 3 {end:.3f}; "
          f"final KL beta=0.01: {free[-1]['objective/kl']:.2f}, beta=0.5: {held[-1]['objective/kl']:.2f}")
    assert end > start + 0.15, (start, end)
    kl_free = sum(r["objective/kl"] for r in free[-3:]) / 3
    kl_held = sum(r["objective/kl"] for r in held[-3:]) / 3
    assert kl_held < kl_free, (kl_held, kl_free)


def rise(rows, key="objective/scores"):
    return sum(r[key] for r in rows[-3:]) / 3 - sum(r[key] for r in rows[:3]) / 3


# The same 8 responses per rollout for every estimator: 2 prompts x 4 samples for the group ones.
ESTIMATORS = {
    "grpo": dict(samples_per_prompt=4, batch_size=2, kl_in="loss", kl_estimator="k3",
                 loss_agg_mode="seq-mean-token-mean"),
    "rloo": dict(samples_per_prompt=4, batch_size=2),
    "reinforce_plus_plus": dict(),
    "reinforce_plus_plus_baseline": dict(samples_per_prompt=4, batch_size=2),
}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_each_critic_free_estimator_raises_the_score(estimator):
    kw = dict(ESTIMATORS[estimator])
    batch = kw.pop("batch_size", 8)
    _, _, rows = train(kl_coef=0.01, critic="none", adv_estimator=estimator, batch_size=batch, **kw)
    print(f"\n{estimator}: brevity score +{rise(rows):.3f}, final KL {rows[-1]['objective/kl']:.2f}")
    assert rise(rows) > 0.15, rows
    assert all(r["objective/kl"] == r["objective/kl"] for r in rows)  # logged, not NaN


class TinyBrevity(BrevityReward):
    """The same signal in hundredths: values in [0, 0.02]."""

    def score(self, prompts, responses):
        return [0.02 * s for s in super().score(prompts, responses)]


def test_a_reward_in_hundredths_learns_like_one_in_units_by_default():
    # Scores are normalised by a running mean and std unless model.ppo.normalize_scores is off.
    _, _, small = train(kl_coef=0.05, reward=TinyBrevity())
    _, _, raw = train(kl_coef=0.05, reward=TinyBrevity(), normalize_scores=False)
    print(f"\nhundredths reward: +{rise(small) / 0.02:.2f} of its range normalised, "
          f"+{rise(raw) / 0.02:.2f} raw")
    assert rise(small) / 0.02 > 0.15 and rise(small) > 2 * rise(raw), (rise(small), rise(raw))
