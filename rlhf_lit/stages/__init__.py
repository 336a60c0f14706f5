"""Training stages: LightningModules that train adapters on the one base model.

- ``base.py``         :class:`AdapterStage`: model, optimizer, checkpoints, RNG, export (every stage)
- ``policy_stage.py`` :class:`PolicyStage`: rewards, sampling, validation and the ``test`` report
- ``update_step.py``  :class:`UpdateStep`: the optimizer step every stage shares
- ``ppo.py``          :class:`PPOModule`: the PPO loop; ``ppo_config.py``: ``model.ppo``
- ``dpo.py``          :class:`DPOModule`: DPO on preference pairs (``model.dpo``); ``reference_cache.py``:
                      the reference log-probs computed once per pair, kept in the run folder
- ``reward_model.py`` :class:`RewardModelModule`: a Bradley-Terry reward model (adapter + scalar head)

A stage is chosen by the config's ``model.class_path`` (PPO when none is given).
"""

from rlhf_lit.stages.base import AdapterStage
from rlhf_lit.stages.dpo import DPOConfig, DPOModule
from rlhf_lit.stages.policy_stage import PolicyStage
from rlhf_lit.stages.ppo import PPOModule
from rlhf_lit.stages.ppo_config import PPOConfig
from rlhf_lit.stages.reward_model import RewardModelConfig, RewardModelModule

__all__ = ["AdapterStage", "DPOConfig", "DPOModule", "PolicyStage", "PPOConfig", "PPOModule", "RewardModelConfig",
           "RewardModelModule"]
