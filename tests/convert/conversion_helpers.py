"""Shared builders of the conversion tests (tests/convert): tiny random HF models, logits on both
sides, safetensors reading, and the process workers the ``conv`` fixture (conftest.py) launches.

Weights use ``init_method_std=0.2`` and perturbed norm weights so logits are of order 1: a wrong
mapping (swapped gate/up, a norm or k not carried over) moves them far beyond ``TOL``, which each
test also checks by comparing k values against each other.
"""

from __future__ import annotations

import importlib.util
import json
import zlib
from pathlib import Path

import torch

from helpers import REPO, tiny_overrides

SMOKE = REPO / "configs" / "smoke.yaml"
SEQ = 32
VOCAB = 512
TOL = 1e-4
K_CHECKS = [None, 1, 3, [3, 1]]  # None: the default (k_train = 2), then two other k' and a per-layer list
MAX_DIFFS = {}  # name -> max |logit difference|, printed at the end of the session (pytest -s)


# ------------------------------------------------------------------------------ shared helpers
def sample_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))


def perturb_norms(model) -> None:
    """Norm weights away from 1, keyed by name so every rank and layout gets the same values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def megatron_model_logits(model, k) -> torch.Tensor:
    from megatron_elastic.moe.control import set_inference_k

    model.eval()
    set_inference_k(model, k)
    tokens = sample_tokens()
    pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, pos, None).float().clone()


def tiny_config(data, run_dir, **extra):
    from megatron_elastic.config import load_config

    base = {"model.init_method_std": 0.2}
    base.update(extra)
    return load_config(SMOKE, tiny_overrides(data, Path(run_dir), **base))


def hf_model_logits(model, k) -> torch.Tensor:
    from megatron_elastic.convert.hf_elastic import set_hf_inference_k

    set_hf_inference_k(model, k)
    with torch.no_grad():
        return model(input_ids=sample_tokens()).logits.float()


def record_diff(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = float((a - b).abs().max())
    MAX_DIFFS[name] = diff
    return diff


def read_safetensors(directory: Path) -> dict:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(directory / name), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_convert_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.15 * noise)


# Shared by every tiny HF model: 4 heads over 2 KV groups, 4 experts of which 2 per token, the
# special ids the tokenizer tests use.
TINY_HF = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=3)


def _tiny_hf(config_name: str, model_name: str, seed: int, **config):
    """A transformers model class with random weights (``randomize``), in eval mode."""
    import transformers

    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**{**TINY_HF, **config}))
    randomize(model, seed)
    return model.eval()


def hf_mixtral(**extra):
    return _tiny_hf("MixtralConfig", "MixtralForCausalLM", 5, **{
        "intermediate_size": 48, "num_hidden_layers": 2, "num_local_experts": 4, **extra})


def hf_qwen3(**extra):
    # head_dim 16 != hidden/heads (8) and tied embeddings: both must survive the trip.
    return _tiny_hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", 6, **{
        "intermediate_size": 64, "moe_intermediate_size": 48, "num_hidden_layers": 2, "head_dim": 16,
        "num_experts": 4, "norm_topk_prob": False, "tie_word_embeddings": True, **extra})


def hf_qwen2(**extra):
    """Qwen2-MoE with a gated shared expert, q/k/v biases and layer 1 dense (mlp_only_layers)."""
    return _tiny_hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", 7, **{
        "intermediate_size": 56, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
        "num_hidden_layers": 3, "mlp_only_layers": [1], "num_experts": 4, "norm_topk_prob": False,
        "qkv_bias": True, **extra})


def hf_olmoe(**extra):
    """OLMoE: QK-norm over the whole q / k projection, raw top-k softmax gates (its default)."""
    return _tiny_hf("OlmoeConfig", "OlmoeForCausalLM", 8, **{
        "intermediate_size": 48, "num_hidden_layers": 2, "num_experts": 4, **extra})


def hf_qwen3_mixed(**extra):
    """Qwen3-MoE with every other layer dense (decoder_sparse_step=2: layers 1 and 3 are MoE) and
    renormalised top-k gates."""
    return hf_qwen3(num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=True, **extra)


# HF builders of the architectures beyond Mixtral / Qwen3-MoE (the ``archs`` fixture).
ARCH_BUILDERS = {"qwen2": hf_qwen2, "olmoe": hf_olmoe, "qwen3_mixed": hf_qwen3_mixed}
# k checks per architecture: the default (k_train = 2), k' = 1 and 3 everywhere, a per-MoE-layer list.
ARCH_K_CHECKS = {"qwen2": [None, 1, 3, [3, 1]], "olmoe": [None, 1, 3, [1, 3]],
                 "qwen3_mixed": [None, 1, 3, [3, 1]]}


# ------------------------------------------------------------------------------ process workers
# Where tensor parallelism splits each weight (dim of the local tensor), as Megatron's column-
# (qkv, fc1, embedding, output) and row-parallel (proj, fc2) layers do.
TP_SPLIT_DIMS = {"linear_qkv.weight": 0, "linear_proj.weight": 1, "word_embeddings.weight": 0,
                  "output_layer.weight": 0, "linear_fc1.weight": 0, "linear_fc2.weight": 1}


def save_tensor_parallel_layout(model, cfg, root: Path, iteration: int) -> None:
    """Save ``model`` exactly as TP=2 / expert-TP=2 ranks would: every tensor-parallel weight as
    two chunks at the global offsets Megatron's parallel layers use, fc1 as [gate0, gate1, up0,
    up1] like its SwiGLU sharded factory.

    Megatron on CPU cannot build a TP>1 MoE model (MoE under TP needs sequence parallelism, which
    the local spec's torch norms refuse), so the TP-sharded checkpoint is produced from the 1-rank
    model's own sharded state dict, split the way the TP ranks would have written it.
    """
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    state = model.sharded_state_dict()
    apply_factories(state)

    def split(x):
        if not isinstance(x, ShardedTensor):
            return x
        dim = next((d for suffix, d in TP_SPLIT_DIMS.items() if x.key.endswith(suffix)), None)
        if dim is None:
            return x
        p = x.prepend_axis_num
        axis = p + dim
        offsets = [(a, x.global_offset[a], x.axis_fragmentations[a]) for a in range(p)]
        offsets += [(a, x.global_offset[a] // x.local_shape[a - p], x.axis_fragmentations[a])
                    for a in range(p, len(x.global_shape)) if a != axis and x.axis_fragmentations[a] > 1]
        chunk = x.global_offset[axis] // x.local_shape[dim]
        return [ShardedTensor.from_rank_offsets(x.key, part.contiguous(), *offsets,
                                                (axis, 2 * chunk + r, 2 * x.axis_fragmentations[axis]),
                                                replica_id=x.replica_id, prepend_axis_num=p)
                for r, part in enumerate(x.data.chunk(2, dim))]

    dict_list_map_inplace(split, state)
    parallel_cfg = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=2, expert_tensor_parallel_size=2,
                                       sequence_parallel=True)
    tp_cfg = dataclasses.replace(cfg, parallel=parallel_cfg)
    directory = root / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    dist_checkpointing.save({"model": state, "iteration": iteration, "config": tp_cfg.to_dict(),
                             "world_size": 2, "checkpoint_version": 1}, str(directory))
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def single_process_work(rank, world_size, data, root):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import load_checkpoint, save_checkpoint

    root = Path(root)
    out = {}
    cfg = tiny_config(data, root)
    parallel.initialize(cfg)
    try:
        # 1-rank twin of the EP=2 model: build_model's weights do not depend on the layout.
        ref = build_model(cfg, VOCAB)
        perturb_norms(ref)
        out["ep2_reference"] = {k: v.detach().clone() for k, v in ref.state_dict().items()
                                if isinstance(v, torch.Tensor)}
        for pre in (False, True):
            c = tiny_config(data, root, **{"model.qk_layernorm": "true", "model.moe_router_pre_softmax": str(pre).lower()})
            m = build_model(c, VOCAB)
            perturb_norms(m)
            save_checkpoint(root / f"qwen_pre{int(pre)}", m, None, c, 0)
            out[f"qwen_pre{int(pre)}"] = {json.dumps(k): megatron_model_logits(m, k) for k in (None, 1, 3)}
        save_tensor_parallel_layout(ref, cfg, root / "tp2", iteration=5)
        # Mixtral through the library (recipe for EP=2); Qwen3-MoE went through the CLI already.
        convert_hf_to_megatron(root / "hf_mixtral", root / "imported_mixtral", expert_model_parallel_size=2,
                               progress=False)
        for name in ("mixtral", "qwen3"):
            imported = root / f"imported_{name}"
            c = load_config(imported / "megatron_config.yaml", ["parallel.expert_model_parallel_size=1"])
            m = build_model(c, VOCAB)
            load_checkpoint(imported, m, None, c, finetune=True)
            out[f"imported_{name}"] = {json.dumps(k): megatron_model_logits(m, k) for k in (None, 1)}
        big = tiny_config(data, root, **{"model.num_layers": 12, "model.hidden_size": 128,
                                  "model.num_moe_experts": 8, "model.moe_ffn_hidden_size": 384})
        m = build_model(big, VOCAB)
        save_checkpoint(root / "big", m, None, big, 3)
        out["big_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
    finally:
        parallel.destroy()
    return out


def ep2_work(rank, world_size, data, root):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.train import run
    from megatron_elastic.training.checkpoint import load_checkpoint, save_checkpoint

    root = Path(root)
    out = {}
    cfg = tiny_config(data, root, **{"parallel.expert_model_parallel_size": 2})
    parallel.initialize(cfg)
    try:
        m = build_model(cfg, VOCAB)
        perturb_norms(m)
        out["local_experts"] = len(m.decoder.layers[0].mlp.experts.local_experts)
        save_checkpoint(root / "ep2", m, None, cfg, 0)
        out["ep2"] = {json.dumps(k): megatron_model_logits(m, k) for k in K_CHECKS}
        # An elastic recipe continues from the imported Mixtral (recipe emitted with EP=2).
        recipe = load_config(root / "imported_mixtral" / "megatron_config.yaml", [
            f"data.data_path=[{data['prefix']}]", "data.split=90,10,0",
            f"checkpoint.save={root / 'trained'}", "checkpoint.save_interval=2",
            "train.train_iters=2", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_interval=0", "train.eval_iters=1", "train.lr_warmup_iters=0", "train.lr=1e-2",
            "model.seq_length=32", "logging.tensorboard_dir=null", "logging.log_interval=1",
            "elastic.schedule=layerwise", "elastic.k_min=1", "elastic.k_max=3",
            "elastic.eval_k=[3,1]", "elastic.router_loss_coeff=1e-3",
        ])
        result = run(recipe)
        out["train_losses"], out["train_iteration"] = result.losses, result.iteration
        trained = build_model(recipe, VOCAB)
        load_checkpoint(root / "trained", trained, None, recipe, finetune=True)
        out["trained"] = megatron_model_logits(trained, [3, 1])  # the recipe's eval_k
    finally:
        parallel.destroy()
    return out


def arch_import_work(rank, world_size, root):
    """Import every ``ARCH_BUILDERS`` model (recipes for expert parallel size 2)."""
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    root = Path(root)
    for name in ARCH_BUILDERS:
        convert_hf_to_megatron(root / f"hf_{name}", root / f"imported_{name}", expert_model_parallel_size=2,
                               progress=False)
    return True


def arch_ep2_work(rank, world_size, data, root):
    """Under expert parallel size 2: each imported model loaded, its logits at every k check,
    saved again (the export's source); then a few steps of EMoE-pool + layer-wise elastic
    training from the imported Qwen2-MoE (shared expert, a dense layer)."""
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.train import run
    from megatron_elastic.training.checkpoint import load_checkpoint, save_checkpoint

    root = Path(root)
    out = {}
    first = load_config(root / "imported_qwen2" / "megatron_config.yaml")
    parallel.initialize(first)
    try:
        for name in ARCH_BUILDERS:
            imported = root / f"imported_{name}"
            cfg = load_config(imported / "megatron_config.yaml")
            assert cfg.parallel.expert_model_parallel_size == 2
            m = build_model(cfg, VOCAB)
            load_checkpoint(imported, m, None, cfg, finetune=True)
            out[f"{name}_local_experts"] = len(next(layer.mlp.experts.local_experts for layer in m.decoder.layers
                                                    if hasattr(layer.mlp, "router")))
            out[name] = {json.dumps(k): megatron_model_logits(m, k) for k in ARCH_K_CHECKS[name]}
            save_checkpoint(root / f"ep2_{name}", m, None, cfg, 0)
        recipe = load_config(root / "imported_qwen2" / "megatron_config.yaml", [
            f"data.data_path=[{data['prefix']}]", "data.split=90,10,0",
            f"checkpoint.save={root / 'trained_qwen2'}", "checkpoint.save_interval=3",
            "train.train_iters=3", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_interval=0", "train.eval_iters=1", "train.lr_warmup_iters=0", "train.lr=1e-2",
            "model.seq_length=32", "logging.tensorboard_dir=null", "logging.log_interval=1",
            "elastic.schedule=layerwise", "elastic.k_min=1", "elastic.k_max=2", "elastic.pool_ratio=2",
            "elastic.eval_k=[2,1]", "elastic.router_loss_coeff=1e-3",
        ])
        result = run(recipe)
        out["train_losses"], out["train_iteration"] = result.losses, result.iteration
        trained = build_model(recipe, VOCAB)
        load_checkpoint(root / "trained_qwen2", trained, None, recipe, finetune=True)
        out["trained_shared_gate"] = trained.decoder.layers[0].mlp.shared_experts.gate_weight.detach().clone()
        out["trained"] = megatron_model_logits(trained, [2, 1])
    finally:
        parallel.destroy()
    return out
