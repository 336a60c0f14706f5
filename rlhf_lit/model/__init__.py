"""The model layer: one base model (bf16 or nf4) with the policy, reference and critic adapters.

- ``config.py``         :class:`PolicyConfig` (``model.policy``) and the role names
- ``loading.py``        the base model, the adapters, vocabulary resizing, dropout off
- ``policy_model.py``   :class:`PolicyModel`: roles, the forward, what the training loop calls
- ``peft_layers.py``    every reach into peft's modules (adapter switching, LoRA factors, fused views)
- ``lora_precision.py`` fp32 master LoRA weights with bf16 compute copies

Nothing above this layer reaches into peft (exporting uses the peft model's own ``save_pretrained``).
"""

from rlhf_lit.model.config import CRITIC, POLICY, REFERENCE, PolicyConfig
from rlhf_lit.model.policy_model import PolicyModel, ResponseOutput

__all__ = ["CRITIC", "POLICY", "REFERENCE", "PolicyConfig", "PolicyModel", "ResponseOutput"]
