"""rlhf_lit: PPO for LoRA persona adapters on PyTorch Lightning."""

__version__ = "0.1.0"
