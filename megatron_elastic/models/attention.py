"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-core's local ``DotProductAttention`` draws its score buffer from a global CUDA memory
buffer and its dropout from the CUDA RNG tracker; Transformer Engine's needs CUDA outright. This
module is the local-spec replacement: same constructor and forward signature as
``DotProductAttention`` (so it drops into ``SelfAttentionSubmodules.core_attention``), causal
masking done by SDPA itself, grouped-query attention by expanding key/value heads. It also takes
the ``k_channels`` / ``v_channels`` that multi-latent attention passes (query/key heads wider than
value heads, as Transformer Engine's ``DotProductAttention`` accepts); Megatron-core's local
``DotProductAttention`` does not, so its MLA local spec cannot be built without this module.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec.")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        # MLA: Attention.__init__ first builds this module without k/v channels (then MLA
        # rebuilds it with them), so v_head_dim is the fallback there.
        if v_channels is None:
            v_channels = getattr(config, "v_head_dim", None) if getattr(config, "multi_latent_attention", False) else None
        k_channels = k_channels or config.kv_channels
        v_channels = v_channels or config.kv_channels
        projection_size = v_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor bias.")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        rep = self.heads_per_partition // self.groups_per_partition
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            # Megatron masks mark positions to *exclude* with True; SDPA wants True = keep.
            mask = ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
        )
        # [b, n, s, h] -> [s, b, n*h]
        s = out.size(2)
        return out.permute(2, 0, 1, 3).reshape(s, out.size(0), self.hidden_size_per_partition)
