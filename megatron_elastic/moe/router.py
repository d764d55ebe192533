"""Elastic router: a Megatron-core ``TopKRouter`` whose k changes per layer and step.

What it adds to ``TopKRouter`` (everything else, z-loss, capacity dropping, the aux-loss
tracker, expert bias, is inherited):

* **k per layer and step** (M-MoE). Training draws k_l from the layer's ``KSampler`` keyed by
  (seed, iteration, global micro-batch, layer) (moe/context.py says why global); evaluation uses the inference k set by
  ``megatron_elastic.moe.control`` (default: the training k, or k_max for varying schedules).
  ``self.topk`` is set to k_l before routing, so Megatron's own top-k, capacity and
  load-balancing code run at k_l and the load-balancing loss is normalised by the k actually used.
* **Per-token top-p** (M-MoE's probability-based variant): each token takes the smallest k whose
  sorted probability mass reaches p, clipped to [k_min, k_max] in training and to the inference
  range (default [1, num_experts], so a fixed-k model can use it too) at evaluation. The mean k
  stays on the device: top-p adds no host sync beyond the one the dispatcher's data-dependent
  output size needs.
* **EMoE candidate pool** (training only): per token, the top k_ideal = round(pool_ratio * k_l)
  experts form a pool from which k_l are drawn uniformly without replacement. The uniforms are a
  counter-based hash of (seed, iteration, layer, global token index), so the draw is identical
  under any data/expert-parallel layout and after a resume. Only the k_l drawn experts reach the
  dispatcher: all-to-all traffic stays at k_l slots per token, never k_ideal.
* **Hierarchical router loss** (EMoE), our reading of seed 003: the paper's L_HR is a reverse-KL
  term against the uniform distribution U over the N experts, added so that minimising it makes
  the router's full probability vector p decisive (far from uniform):

      L_HR = lambda * mean_tokens( -KL(p || U) ) = lambda * mean_tokens( H(p) - log N )

  Its sign makes the minimum at one-hot p (value -log N) and the maximum, 0, at p = U. Reverse KL
  is chosen because d KL(p||U)/dp_i = log(N p_i) + 1 stays bounded in the softmax logits'
  gradient as p_i -> 0, whereas the forward KL(U||p) has a 1/p_i term. Logged per layer as
  ``hierarchical_router_loss`` (the value before lambda), like Megatron's load_balancing_loss.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_elastic.moe import routing_math
from megatron_elastic.moe.context import StepContext
from megatron_elastic.moe.routing_math import derive_seed, top_p_k
from megatron_elastic.moe.schedules import KSampler

_POOL_TAG = 0x454D4F45  # "EMOE": keeps pool draws independent of the k draws


class ElasticRouter(TopKRouter):
    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.sampler: Optional[KSampler] = None
        self.context: StepContext = StepContext()
        self.pool_ratio: Optional[float] = None
        self.router_loss_coeff: float = 0.0
        self.pool_seed: int = 0
        self.top_p: Optional[float] = None  # training top-p (schedule top_p)
        self.k_min: int = config.moe_router_topk
        self.k_max: int = config.moe_router_topk
        # Inference control: a fixed k' or a top-p threshold; None = default_eval_k.
        self.eval_k: Optional[int] = None
        self.eval_top_p: Optional[float] = None
        self.eval_top_p_range: tuple = (1, config.num_moe_experts)
        self.default_eval_k: int = config.moe_router_topk
        # What the last forward did, for logging and for the dispatcher's buffer sizing:
        # an int when every token used the same k, None when k varied per token.
        self.last_k: Optional[int] = None
        # A float for a fixed k, a 0-d device tensor for per-token k (never synced here).
        self.last_mean_k = float(config.moe_router_topk)
        # Position among all the model's MoE layers (global, whichever pipeline stage holds
        # this one) and their count: set by attach_elastic; per-layer k lists are indexed by it.
        self.moe_index: Optional[int] = None
        self.num_moe_layers: Optional[int] = None
        self.record_routing: bool = False
        self.last_routing_map: Optional[torch.Tensor] = None
        self.last_scores: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ configuration
    def configure(
        self,
        sampler: KSampler,
        context: StepContext,
        pool_ratio: Optional[float],
        router_loss_coeff: float,
        seed: int,
        top_p: Optional[float],
        default_eval_k: int,
    ) -> None:
        self.sampler = sampler
        self.context = context
        self.pool_ratio = pool_ratio
        self.router_loss_coeff = router_loss_coeff
        self.pool_seed = seed
        self.top_p = top_p
        self.k_min, self.k_max = sampler.k_min, sampler.k_max
        self.default_eval_k = default_eval_k

    def set_inference(self, k: Optional[int] = None, top_p: Optional[float] = None,
                      top_p_k_range: Optional[tuple] = None) -> None:
        """Inference k' (an int), or a top-p threshold with its per-token k range (default
        [1, num_experts]); neither restores the default k."""
        if k is not None and not 1 <= k <= self.num_experts:
            raise ValueError(f"k'={k} must lie in [1, num_experts={self.num_experts}]")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must lie in (0, 1]")
        if k is not None and top_p is not None:
            raise ValueError("set either k or top_p, not both")
        group_topk = self.config.moe_router_group_topk
        if top_p is not None and (self.enable_expert_bias or group_topk):
            raise ValueError("inference top-p chooses from the plain router scores, without the expert "
                             "bias or the group limit this router selects with: set a k instead")
        if k is not None and group_topk and k > group_topk * (self.num_experts // self.config.moe_router_num_groups):
            raise ValueError(f"k'={k} exceeds the experts of the {group_topk} groups a token may use")
        if k is not None and group_topk and k // group_topk != self.k_max // group_topk:
            raise ValueError(
                f"k'={k} with group-limited routing (group_topk={group_topk}): Megatron-core ranks groups "
                f"by their top-(k // group_topk) scores, so k' must keep the trained width "
                f"{self.k_max // group_topk}, i.e. lie in [{group_topk * (self.k_max // group_topk)}, "
                f"{group_topk * (self.k_max // group_topk + 1) - 1}]")
        lo, hi = top_p_k_range if top_p_k_range is not None else (1, self.num_experts)
        if not 1 <= lo <= hi <= self.num_experts:
            raise ValueError(f"top-p k range [{lo}, {hi}] must lie within [1, {self.num_experts}]")
        self.eval_k, self.eval_top_p = k, top_p
        self.eval_top_p_range = (int(lo), int(hi))

    # ------------------------------------------------------------------ forward pieces
    def _layer_index(self) -> int:
        return (self.layer_number or 1) - 1

    def _step_k(self, micro_batch_size: int) -> Optional[int]:
        """This forward's k, or None when k is decided per token (top-p)."""
        if self.training:
            if self.sampler is None:
                return self.config.moe_router_topk
            if self.sampler.per_token:
                return None
            ctx = self.context
            return self.sampler.k_for(ctx.iteration, ctx.global_microbatch(micro_batch_size),
                                      self._layer_index())
        if self.eval_top_p is not None:
            return None
        return self.eval_k if self.eval_k is not None else self.default_eval_k

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Full routing distribution over all experts (what pools, top-p and L_HR read)."""
        if self.score_function == "softmax":
            return torch.softmax(logits, dim=-1, dtype=torch.float32)
        scores = torch.sigmoid(logits.float())
        return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)

    def _renormalise(self, k_is_one: bool) -> bool:
        """Whether selected gates are renormalised, matching Megatron's top-k semantics."""
        if self.score_function == "softmax":
            return not self.config.moe_router_pre_softmax
        return not k_is_one

    def _token_ids(self, seq_length: int, bsz: int, device) -> torch.Tensor:
        """Global token ids for [s, b] flattened tokens: (sample_offset + b) * s_len + s.

        Under sequence parallelism (required with TP > 1) this rank routes the tp_rank-th
        contiguous chunk of the sequence: s is shifted by tp_rank * seq_length and s_len is the
        full length, so ids (and pool draws) match a TP = 1 run and never collide across TP ranks.
        """
        s_offset, full_length = 0, seq_length
        if self.config.sequence_parallel:
            tp_size = get_pg_size(self.tp_group)
            if tp_size > 1:
                s_offset = get_pg_rank(self.tp_group) * seq_length
                full_length = seq_length * tp_size
        s = torch.arange(seq_length, device=device).unsqueeze(1) + s_offset
        b = torch.arange(bsz, device=device).unsqueeze(0) + self.context.sample_offset
        return (b * full_length + s).reshape(-1)

    # ------------------------------------------------------------------ routing
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        k = self._step_k(logits.shape[1])  # logits are [s, b, experts]
        use_pool = self.training and self.pool_ratio is not None and k is not None
        if k is not None and not use_pool:
            self.topk = k
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            self.last_k, self.last_mean_k = k, float(k)
        else:
            probs, routing_map = self._custom_routing(logits, k, padding_mask)
        flat_logits = logits.reshape(-1, self.num_experts)
        probs = self._apply_router_loss(probs, flat_logits, padding_mask)
        if self.record_routing:
            self.last_routing_map = routing_map.detach()
            # The full routing distribution, for router diagnostics (entropy, ranking stability).
            self.last_scores = self._scores(flat_logits.detach())
        if self.training and torch.is_grad_enabled():
            self._log_k()  # next to Megatron's aux losses, which it logs on the same condition
        return probs, routing_map

    def _custom_routing(self, logits, k: Optional[int], padding_mask):
        """Candidate-pool sampling or per-token top-p, with Megatron's losses attached.

        MIRRORS upstream: the tail of ``TopKRouter.routing`` in megatron-core 0.16.1
        (megatron/core/transformer/moe/router.py: z-loss, score function, top-k scaling factor,
        token dropping, the three aux losses through the private ``_apply_*aux_loss`` methods,
        expert bias), with the selection replaced by the pool draw or the per-token top-p map.
        On a megatron-core upgrade re-read that method and keep this one in step; the tests in
        tests/moe/test_router.py compare both paths at equal k.
        """
        seq_length, bsz = logits.shape[:2]
        logits = logits.reshape(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        scores = self._scores(logits)
        # Gates before renormalisation: softmax gates are the routing distribution itself (not
        # computed twice); sigmoid gates are the unnormalised sigmoids.
        raw = scores if self.score_function == "softmax" else torch.sigmoid(logits.float())
        if k is not None:
            # EMoE: draw k of the top k_ideal per token.
            k_ideal = routing_math.candidate_pool_size(k, self.pool_ratio, self.num_experts)
            key = derive_seed(_POOL_TAG, self.pool_seed, self.context.iteration, self._layer_index())
            uniforms = routing_math.keyed_uniforms(
                self._token_ids(seq_length, bsz, logits.device), k_ideal, key
            )
            _, idx = routing_math.sample_from_candidate_pool(
                scores.detach(), k, k_ideal, uniforms=uniforms
            )
            routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)
            self.topk = k
            self.last_k, self.last_mean_k = k, float(k)
        else:
            if self.training:
                p, (lo, hi) = self.top_p, (self.k_min, self.k_max)
            else:
                p, (lo, hi) = self.eval_top_p, self.eval_top_p_range
            k_tok = top_p_k(scores.detach(), p, lo, hi)
            routing_map, _ = routing_math.per_token_topk(scores.detach(), k_tok, hi, validate=False)
            # Megatron's load-balancing normalisation reads topk: the mean k actually used,
            # kept on the device (a tensor divides like a number there).
            mean_k = k_tok.float().mean()
            self.topk = mean_k
            self.last_k, self.last_mean_k = None, mean_k
        selected = raw * routing_map
        if self._renormalise(self.last_k == 1):
            selected = selected / (selected.sum(dim=-1, keepdim=True) + 1e-20)
        if self.config.moe_router_topk_scaling_factor:
            selected = selected * self.config.moe_router_topk_scaling_factor
        probs = selected.type_as(logits)
        if self.config.moe_expert_capacity_factor is not None:
            if k is None and self.config.moe_pad_expert_input_to_capacity:
                # Per-token k padded to capacity: the padded buffers must have the same shape on
                # every expert-parallel rank (equal-split all-to-all), and the mean k is
                # rank-local. Size from the static bound, as Megatron does (the dispatcher
                # keeps Megatron's capacity for this case).
                capacity_k = self.config.moe_router_topk
            else:
                # Dropping needs the capacity on the host; Megatron syncs here too.
                capacity_k = k if k is not None else max(1, round(float(self.topk)))
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=capacity_k,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            # Only the scores are used (the map returned for this k is replaced by the one
            # actually dispatched), so the static bound serves as k without a host sync.
            _, scores_for_aux = compute_routing_scores_for_aux_loss(
                logits, self.config.moe_router_topk, self.score_function, padding_mask=padding_mask
            )
            # Balance what is actually dispatched: the sampled / per-token map.
            aux_map = routing_map if padding_mask is None else routing_map & ~padding_mask.unsqueeze(-1)
            probs = self._apply_aux_loss(probs, scores_for_aux, aux_map, padding_mask is not None)
            probs = self._apply_seq_aux_loss(
                probs, scores_for_aux, aux_map, seq_length, bsz, padding_mask is not None
            )
            probs = self._apply_global_aux_loss(probs, scores_for_aux, aux_map, padding_mask is not None)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def _apply_router_loss(self, probs: torch.Tensor, logits: torch.Tensor,
                           padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        coeff = self.router_loss_coeff
        if not coeff or not self.training or not torch.is_grad_enabled():
            return probs
        # Under TP/CP each rank routes its own slice of the tokens and the router's gradients
        # are summed over the tp x cp group, so each rank contributes its local mean divided by
        # the group size (Megatron scales its z-loss the same way): the effective lambda is the
        # configured one under any layout. The tracker sums the logged value over that group,
        # which turns the per-rank shares back into the global mean.
        group_size = self.tp_cp_group.size()
        # Padding (chat data) is left out of the mean, as Megatron's aux losses leave it out.
        loss = (coeff / group_size) * routing_math.hierarchical_router_loss(self._scores(logits),
                                                                          padding=padding_mask)
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, loss, "hierarchical_router_loss", self.tp_cp_group
        )

    def _log_k(self) -> None:
        """Record this forward's k in Megatron's per-layer tracker (the log's 'k', summed over
        micro-batches like the aux losses and averaged by the trainer's metrics)."""
        num_layers = self.config.num_layers
        k = self.last_mean_k
        # torch.full, not torch.tensor: a fill kernel, where torch.tensor(k, device=cuda) would
        # copy from pageable host memory and synchronise the stream at every MoE layer.
        k = k.detach().float() if torch.is_tensor(k) else torch.full((), float(k), device=self.weight.device)
        save_to_aux_losses_tracker("k", k, self.layer_number, num_layers)


def elastic_routers(model) -> List[ElasticRouter]:
    """The model's elastic routers in depth order (by global layer number); ``model`` may be a
    list of model chunks (pipeline parallelism with virtual stages)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, ElasticRouter)]
    return sorted(routers, key=lambda r: r.layer_number or 0)
