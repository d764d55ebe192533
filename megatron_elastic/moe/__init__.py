"""Elastic Mixture-of-Experts building blocks (M-MoE / EMoE) on top of Megatron-core.

Submodules:
    schedules     -- deterministic, communication-free choice of the number of
                     activated experts ``k`` per (iteration, micro-batch, layer).
    routing_math  -- pure tensor functions used by the elastic router
                     (top-k / per-token top-k / candidate-pool sampling,
                     hierarchical router loss, variable-k load-balancing loss).
"""
