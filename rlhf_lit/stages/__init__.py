"""Training stages: LightningModules that train adapters on the one base model.

- ``base.py``         :class:`AdapterStage`: model, optimizer, checkpoints, RNG, export (every stage)
- ``policy_stage.py`` :class:`PolicyStage`: rewards, sampling, validation and the ``test`` report
- ``update_step.py``  :class:`UpdateStep`: the optimizer step every stage shares
- ``ppo.py``          :class:`PPOModule`: the PPO loop; ``ppo_config.py``: ``model.ppo``

A stage is chosen by the config's ``model.class_path`` (PPO when none is given).
"""

from rlhf_lit.stages.base import AdapterStage
from rlhf_lit.stages.policy_stage import PolicyStage
from rlhf_lit.stages.ppo import PPOModule
from rlhf_lit.stages.ppo_config import PPOConfig

__all__ = ["AdapterStage", "PolicyStage", "PPOConfig", "PPOModule"]
