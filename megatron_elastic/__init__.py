"""megatron-elastic: Megatron-core MoE training with elastic (inference-time) expert counts."""

__version__ = "0.1.0"
