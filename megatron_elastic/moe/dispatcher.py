"""All-to-all token dispatcher for a per-layer, per-step k.

Megatron-core's ``MoEAlltoAllTokenDispatcher`` sizes its dropless permutation output as
``num_tokens * config.moe_router_topk`` and its capacity from the same constant. Here the router
hands over the k it used for this forward before dispatch:

* an int k_l: dropless output is ``num_tokens * k_l``, known on the host, so no device sync is
  added; with a capacity factor, capacity is computed from ``num_tokens * k_l``;
* None (per-token top-p): the output size is the measured number of selected slots, synced the
  way Megatron syncs its capacity-factor path.

The tensor handed to the all-to-all is exactly the permuted selection: k_l rows per token. With
an EMoE candidate pool the router selects k_l experts, so traffic is sized to k_train and never to
k_ideal. ``last_dispatch_bytes`` records what this rank sent in the last dispatch, for tests and
benchmarks.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import get_capacity
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


class ElasticAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_topk: Optional[int] = self.config.moe_router_topk
        self.last_dispatch_bytes: int = 0
        self.last_dispatch_rows: int = 0

    def set_step_k(self, k: Optional[int]) -> None:
        """The k the router used for this forward (None: decided per token)."""
        self.step_topk = k

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        # Megatron fixes its sync point once per configuration; here it depends on this
        # forward's k (a per-token k needs an earlier one), so it is decided afresh each time
        # instead of staying where one top-p forward moved it.
        self.cuda_sync_point = "no_sync"
        tokens_per_local_expert = super().preprocess(routing_map)
        k = self.step_topk
        num_tokens = routing_map.size(0)
        if self.drop_and_pad and k is None:
            # Per-token k padded to capacity: the router padded its map to the capacity of the
            # static bound moe_router_topk (identical on every EP rank); super() sized it so.
            pass
        elif self.drop_and_pad:
            self.capacity = get_capacity(
                num_tokens=num_tokens * k,
                num_experts=self.num_experts,
                capacity_factor=self.moe_expert_capacity_factor,
            )
            self.num_out_tokens = self.capacity * self.num_experts
            tokens_per_local_expert = torch.full(
                (self.num_local_experts,),
                self.capacity * self.tp_size * self.ep_size,
                dtype=torch.long,
            )
            self.num_global_tokens_per_local_expert = torch.full(
                (self.num_experts * self.tp_size,),
                self.capacity,
                dtype=torch.long,
                device=self.permute_idx_device,
            )
        elif self.config.moe_expert_capacity_factor is None and not self.config.moe_router_padding_for_quantization:
            if k is None:
                # Per-token k: the slot count is data dependent, read it like the capacity path.
                self.num_out_tokens = routing_map.sum()
                self._maybe_update_cuda_sync_point("before_permutation_1")
            else:
                self.num_out_tokens = num_tokens * k
        return tokens_per_local_expert

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
        tokens_per_expert = super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)
        if point == self.cuda_sync_point:
            # Only now are the host copies of the split sizes valid (on GPU they are
            # non-blocking copies Megatron waits for here). Megatron leaves them numpy arrays;
            # gloo's all_to_all_single takes lists only, and lists work for NCCL too.
            self._splits_as_lists()
        return tokens_per_expert

    def _splits_as_lists(self) -> None:
        for name in ("input_splits", "output_splits"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, list):
                setattr(self, name, [int(v) for v in value.tolist()])

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        self.last_dispatch_rows = int(permutated_local_input_tokens.size(0))
        self.last_dispatch_bytes = (
            permutated_local_input_tokens.numel() * permutated_local_input_tokens.element_size()
        )
        return super().token_dispatch(permutated_local_input_tokens, permuted_probs)
