"""Elastic Mixture-of-Experts building blocks (M-MoE / EMoE) on top of Megatron-core.

One file per part, as in Megatron-core's ``transformer/moe``:
    routing_math  -- pure functions of tensors: the counter-based hash (SplitMix64), per-token
                     top-p k, per-token top-k, candidate-pool sampling, the hierarchical router
                     loss, expert co-occurrence.
    schedules     -- deterministic, communication-free choice of k per (iteration, micro-batch,
                     layer): ``KSampler``.
    context       -- the step coordinates the training loop hands the routers.
    router        -- ``ElasticRouter`` (a Megatron ``TopKRouter``): decides and records k.
    dispatcher    -- ``ElasticAlltoAllTokenDispatcher``: buffers and all-to-all sized to k.
    layer         -- ``ElasticMoELayer`` wiring the two, and ``attach_elastic``.
    control       -- inference k: global, per-layer budget, top-p.
"""
