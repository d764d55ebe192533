"""DeepSeek-V2/V3 family import (HF directory -> Megatron checkpoint + recipe) and export (Megatron
checkpoint -> ``DeepseekV3ForCausalLM`` or ``DeepseekV2ForCausalLM`` directory).

``from_hf.convert_hf_to_megatron`` and ``to_hf.convert_megatron_to_hf`` hand DeepSeek models
(``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM`` in, multi-latent-attention checkpoints out)
to this module; the tensor layouts and the config fields are ``deepseek_v3``'s pure functions. The
export writes V3 for a sigmoid router and V2 for a pre-softmax one (``deepseek_v3.hf_class_for``).

Released checkpoints: multi-token-prediction layers are skipped with a printed note (Megatron-core's
MTP is not built here; the export writes num_nextn_predict_layers = 0), and block-wise fp8 weights
are dequantized to the recipe's dtype as they are copied in.

The import copies the weights into the project's own model (``models/gpt.build_model``) and saves
it with the trainer's checkpoint code, like the Mixtral / Qwen3-MoE import, so the recipe trains
from it under any TP/EP layout. The export loads the checkpoint into the same model built in one
process (``dist_checkpointing`` reshards any saved layout) and maps its ``state_dict``: memory is
the whole model once plus the safetensors shard being filled, not one layer at a time as in the
Mixtral / Qwen3-MoE export.

Shared experts and dense first layers are the model section's ``moe_shared_expert_intermediate_size``
(ungated) and ``moe_layer_freq`` (a 0/1 list), the keys Qwen2-MoE uses too.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.convert import ConversionError, ShapeMismatchError
from megatron_elastic.convert import deepseek_v3 as ds

_SHARED_KEY, _FREQ_KEY = "moe_shared_expert_intermediate_size", "moe_layer_freq"


# ------------------------------------------------------------------------------ config <-> recipe
def recipe_model_section(hf, source: str) -> dict:
    """The recipe's ``model`` section for a DeepseekV3Config (checked with ``ds.check_supported``)."""
    ds.check_supported(hf, source)
    f = ds.megatron_fields(hf)
    shape = ds.shape_from_hf(hf)
    v2 = ds.is_v2(hf)
    max_pos = int(f["max_position_embeddings"])
    model = {
        "num_layers": f["num_layers"],
        "hidden_size": f["hidden_size"],
        "num_attention_heads": f["num_attention_heads"],
        "num_query_groups": f["num_attention_heads"],  # MLA: one key/value head per query head
        "kv_channels": shape.q_head_dim,  # unused by MLA; keeps the hidden/heads check out of the way
        "ffn_hidden_size": f["ffn_hidden_size"],
        "seq_length": min(max_pos, 4096),
        "max_position_embeddings": max_pos,
        "vocab_size": f["vocab_size"],  # as is, so a round trip keeps every shape
        "normalization": "RMSNorm",
        "norm_epsilon": f["layernorm_epsilon"],
        "qk_layernorm": True,
        "rotary_base": f["rotary_base"],
        "init_method_std": f["init_method_std"],
        "untie_embeddings_and_output_weights": f["untie_embeddings_and_output_weights"],
        "num_moe_experts": f["num_moe_experts"],
        "moe_ffn_hidden_size": f["moe_ffn_hidden_size"],
        "moe_router_topk": f["moe_router_topk"],
        "moe_router_score_function": f["moe_router_score_function"],
        "moe_router_pre_softmax": f["moe_router_pre_softmax"],
        # DeepSeek-V3 balances with the expert bias (aux-loss-free, update speed 1e-3), not an aux loss;
        # DeepSeek-V2 with an expert-level aux loss (aux_loss_alpha, 0.001 in V2-Lite).
        "moe_router_load_balancing_type": "aux_loss" if v2 else "none",
        "moe_aux_loss_coeff": float(getattr(hf, "aux_loss_alpha", 0.001) or 0.0) if v2 else 0.0,
        "moe_router_dtype": "fp32",
        "rope_type": f["rope_type"],
    }
    if f["rope_type"] == "yarn":
        model.update({key: f[key] for key in ds.YARN_KEYS})
    for key in ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                "v_head_dim", "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
                "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor"):
        model[key] = f[key]
    if shape.n_shared_experts:
        model[_SHARED_KEY] = f[_SHARED_KEY]
    if shape.first_k_dense_replace:
        model[_FREQ_KEY] = f[_FREQ_KEY]
    return model


def recipe_from_hf(hf, output: Optional[Path], tensor_model_parallel_size: int, expert_model_parallel_size: int,
                   tokenizer_model: Optional[Path], source: str) -> Config:
    from megatron_elastic.convert.hf_config import elastic_section

    meta = dict(getattr(hf, "elastic_moe", None) or {})
    k_cfg = int(hf.num_experts_per_tok)
    tp, ep = tensor_model_parallel_size, expert_model_parallel_size
    raw = {
        "model": recipe_model_section(hf, source),
        "parallel": {"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep,
                     "sequence_parallel": tp > 1},
        "data": {"tokenizer_model": str(tokenizer_model) if tokenizer_model else None},
        "checkpoint": {"load": str(output) if output else None, "finetune": True},
        "elastic": elastic_section(meta, k_cfg, int(meta.get("k_train", k_cfg))),
    }
    raw["model"]["moe_router_topk"] = int(meta.get("k_train", k_cfg))
    try:
        cfg = Config.from_dict(raw, source=source).validate()
    except ConfigError as exc:
        raise ConversionError(f"{source}: cannot express this model as a Megatron recipe: {exc}") from exc
    if cfg.model.vocab_size % tp:
        raise ConversionError(
            f"vocab_size={cfg.model.vocab_size} is not divisible by tensor_model_parallel_size={tp}: choose a "
            "TP size that divides it")
    return cfg


def fields_from_recipe(cfg: Config, vocab_size: int) -> dict:
    """``ds.megatron_fields``' vocabulary from a recipe (the export's view of the model)."""
    m = cfg.model
    return {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
        "ffn_hidden_size": m.ffn_hidden_size or m.moe_ffn_hidden_size, "layernorm_epsilon": m.norm_epsilon,
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_head_dim": m.qk_head_dim,
        "qk_pos_emb_head_dim": m.qk_pos_emb_head_dim, "v_head_dim": m.v_head_dim, "rotary_base": m.rotary_base,
        "num_moe_experts": m.num_moe_experts, "moe_ffn_hidden_size": m.moe_ffn_hidden_size,
        _SHARED_KEY: m.moe_shared_expert_intermediate_size,
        _FREQ_KEY: m.moe_layer_pattern,
        "moe_router_topk": cfg.default_eval_k, "moe_router_score_function": m.moe_router_score_function,
        "moe_router_pre_softmax": m.moe_router_pre_softmax,
        "moe_router_enable_expert_bias": m.moe_router_enable_expert_bias,
        "moe_router_num_groups": m.moe_router_num_groups, "moe_router_group_topk": m.moe_router_group_topk,
        "moe_router_topk_scaling_factor": m.moe_router_topk_scaling_factor,
        "untie_embeddings_and_output_weights": m.untie_embeddings_and_output_weights,
        "vocab_size": vocab_size, "max_position_embeddings": m.max_position_embeddings or m.seq_length,
        "init_method_std": m.init_method_std,
        "rope_type": m.rope_type, **{key: getattr(m, key) for key in ds.YARN_KEYS},
    }


def check_exportable(cfg: Config) -> None:
    """Refuse a multi-latent-attention recipe DeepseekV3ForCausalLM / DeepseekV2ForCausalLM would
    compute differently."""
    m = cfg.model
    problems = []
    if not m.qk_layernorm:
        problems.append("model.qk_layernorm=false (DeepSeek-V3 always normalises the q/kv latents)")
    if m.normalization != "RMSNorm":
        problems.append(f"model.normalization={m.normalization} (DeepSeek-V3 uses RMSNorm)")
    if abs(m.norm_epsilon - ds.LATENT_NORM_EPS) > 1e-12:
        problems.append(f"model.norm_epsilon={m.norm_epsilon} (transformers' latent norms always use "
                        f"{ds.LATENT_NORM_EPS})")
    try:
        ds.hf_class_for({"moe_router_score_function": m.moe_router_score_function,
                         "moe_router_pre_softmax": m.moe_router_pre_softmax,
                         "moe_router_enable_expert_bias": m.moe_router_enable_expert_bias})
    except ConversionError as exc:
        problems.append(str(exc))
    if problems:
        raise ConversionError("cannot export as DeepseekV3ForCausalLM or DeepseekV2ForCausalLM: " + "; ".join(problems))


# ------------------------------------------------------------------------------ import
def import_deepseek_v3(hf_dir: Path, output: Path, *, tensor_model_parallel_size: int = 1,
                       expert_model_parallel_size: int = 1, config_out=None, overwrite: bool = False,
                       progress: bool = True):
    from tqdm import tqdm
    from transformers import AutoConfig

    from megatron_elastic.convert.from_hf import ImportResult, tokenizer_to_import, write_import
    from megatron_elastic.convert.hf_reader import HFWeights, check_tokenizer_fits

    start = time.time()
    source = str(hf_dir / "config.json")
    hf = AutoConfig.from_pretrained(str(hf_dir))
    tokenizer, final_tokenizer = tokenizer_to_import(hf_dir, output)
    cfg = recipe_from_hf(hf, output.resolve(), tensor_model_parallel_size, expert_model_parallel_size,
                         final_tokenizer.resolve() if final_tokenizer else None, source)
    shape = ds.shape_from_hf(hf)
    check_tokenizer_fits(hf_dir, shape.vocab_size)
    weights = HFWeights(hf_dir)
    fp8_block = ds.fp8_block_size(hf)
    skipped = _check_hf_weights(weights, shape, str(hf_dir), fp8_block)  # every tensor located and checked first
    if skipped:
        print(f"note: skipped {skipped} tensors of {int(getattr(hf, 'num_nextn_predict_layers', 0) or 0)} "
              "multi-token-prediction layer(s): Megatron-core's MTP is not built by this project, so the "
              "imported model predicts the next token only", flush=True)
    get = _dequantizing_getter(weights, fp8_block)

    def tensors():
        yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
        for i in tqdm(range(shape.num_layers), desc="HF -> Megatron", unit="layer", disable=not progress,
                      dynamic_ncols=True):
            yield from ds.hf_to_megatron_layer(get, shape, i).items()
        yield "decoder.final_layernorm.weight", get("model.norm.weight")
        if not shape.tied_embeddings:
            yield "output_layer.weight", get("lm_head.weight")
        weights.close()

    recipe, num = write_import(hf_dir, output, cfg, shape.vocab_size, (tokenizer, final_tokenizer), _model_state,
                               ds.megatron_param_shapes(shape), tensors, config_out=config_out,
                               overwrite=overwrite, use_te=False)
    return ImportResult(output=output, checkpoint_dir=output / "iter_0000000", config_path=recipe,
                        architecture=ds.ARCH_V2 if ds.is_v2(hf) else ds.ARCH, config=cfg, num_tensors=num,
                        seconds=time.time() - start)


def _dequantizing_getter(weights, block):
    """``weights.get``, with fp8 weights multiplied by their block scales (fp32 out; ``put`` casts
    to the model's dtype); an fp8 tensor without a scale is refused (casting it would be wrong)."""
    names = set(weights.names())

    def get(name: str) -> torch.Tensor:
        value = weights.get(name)
        if block is not None and name + ds.FP8_SCALE_SUFFIX in names:
            return ds.dequantize_fp8(value, weights.get(name + ds.FP8_SCALE_SUFFIX), block)
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ConversionError(
                f"{weights.dir}: {name} is stored as {value.dtype} without a {name}{ds.FP8_SCALE_SUFFIX} "
                "(or config.json has no fp8 quantization_config): its real values are unknown")
        return value

    return get


def _check_hf_weights(weights, shape: ds.DeepseekShape, source: str, fp8_block=None) -> int:
    """Every tensor present with its shape (fp8 scales tiling their weights); returns how many
    multi-token-prediction tensors the import skips."""
    from megatron_elastic.convert import MissingTensorError

    expected = dict(ds.hf_param_shapes(shape))
    have = {name: tuple(weights.shape(name)) for name in weights.names()}
    mtp = ds.mtp_tensor_names(have, shape)
    for name in mtp:
        del have[name]
    if fp8_block is not None:
        for name in [n for n in have if n.endswith(ds.FP8_SCALE_SUFFIX)]:
            weight = name[: -len(ds.FP8_SCALE_SUFFIX)]
            if weight in expected and len(expected[weight]) == 2:
                expected[name] = ds.fp8_scale_shape(expected[weight], fp8_block)
    elif any(n.endswith(ds.FP8_SCALE_SUFFIX) for n in have):
        raise ConversionError(f"{source} holds fp8 scales (*{ds.FP8_SCALE_SUFFIX}) but config.json has no fp8 "
                              "quantization_config with weight_block_size: the config does not describe the weights")
    # transformers writes the zero-width shared MLP of n_shared_experts=0; other writers may not.
    missing = [n for n, s in expected.items() if n not in have and 0 not in s]
    if missing:
        raise MissingTensorError(
            f"{source} has no tensor {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
            "the weights do not match config.json (or use a fused expert layout; save with transformers' "
            "save_pretrained, which writes one tensor per expert)")
    for name, got in have.items():
        if name not in expected:
            raise ConversionError(f"{source} holds {name}, which the DeepSeek mapping does not use "
                                  "(config.json does not describe these weights)")
        if got != expected[name]:
            raise ShapeMismatchError(f"shape mismatch for {name} in {source}: stored {got}, expected "
                                     f"{expected[name]} from config.json")
    return len(mtp)


def _model_state(model) -> dict:
    """Parameters and the persistent expert-bias buffers by state_dict name (live tensors)."""
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
            if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state")}


# ------------------------------------------------------------------------------ export
def export_deepseek_v3(ckpt_dir: Path, cfg: Config, iteration: Optional[int], output: Union[str, os.PathLike], *,
                       architecture: Optional[str] = None, dtype=None, max_shard_size="5GB", tokenizer_model=None,
                       overwrite: bool = False,
                       progress: bool = True):
    from transformers import DeepseekV2Config, DeepseekV3Config

    from megatron_elastic.convert.from_hf import one_process_config, single_process_parallel
    from megatron_elastic.convert.hf_config import default_inference_k, elastic_metadata
    from megatron_elastic.convert.hf_writer import ShardWriter, parse_size, prepare_output
    from megatron_elastic.convert.megatron_checkpoint import DistCheckpointSource
    from megatron_elastic.convert.to_hf import ExportResult, _resolve_dtype, export_tokenizer, finish_export

    start = time.time()
    check_exportable(cfg)
    source = DistCheckpointSource(ckpt_dir)
    emb = "embedding.word_embeddings.weight"
    if emb not in source.shapes:
        raise ConversionError(f"{source.description} has no '{emb}': is this a model checkpoint?")
    vocab = source.shapes[emb][0]
    fields = fields_from_recipe(cfg, vocab)
    hf_kwargs = ds.hf_config_kwargs(fields)
    v2 = ds.hf_class_for(fields) == ds.HF_CLASS_V2
    if architecture not in (None, "auto", ds.ARCH_V2 if v2 else ds.ARCH):
        raise ConversionError(
            f"--architecture {architecture}: this model's router (model.moe_router_score_function="
            f"{cfg.model.moe_router_score_function}, moe_router_pre_softmax={cfg.model.moe_router_pre_softmax}) "
            f"is {ds.ARCH_V2 if v2 else ds.ARCH}'s; export it as that (or auto)")
    config_class = DeepseekV2Config if v2 else DeepseekV3Config
    hf = config_class(**hf_kwargs)
    ds.check_supported(hf, "the checkpoint's config")
    for k in sorted({cfg.default_eval_k} | set(cfg.elastic.eval_k if isinstance(cfg.elastic.eval_k, list) else [])):
        ds.check_inference_k(hf, k, "the checkpoint's inference k")
    shape = ds.shape_from_hf(hf)
    out_dtype = _resolve_dtype(dtype, source, emb)
    tok_path, special = export_tokenizer(cfg, tokenizer_model, vocab, emb)
    special = special or {}
    output = Path(output)
    tmp = prepare_output(output, overwrite, (ckpt_dir,))
    result = ExportResult(output=output, architecture=ds.ARCH_V2 if v2 else ds.ARCH, iteration=iteration,
                          checkpoint_dir=ckpt_dir)
    try:
        build_cfg = one_process_config(cfg)
        with single_process_parallel():
            from megatron_elastic.device import seed_all
            from megatron_elastic.models.gpt import build_model
            from megatron_elastic.training.checkpoint import load_checkpoint

            seed_all(cfg.train.seed)
            model = build_model(build_cfg, vocab, use_te=False)
            load_checkpoint(ckpt_dir, model, None, build_cfg, finetune=True)
            state = {k: v.detach() for k, v in _model_state(model).items() if not k.endswith("local_tokens_per_expert")}
            del model
        if not v2 and not cfg.model.moe_router_enable_expert_bias:
            # A router without the bias is DeepSeek's with a zero e_score_correction_bias.
            for name in list(state):
                if name.endswith("mlp.router.weight"):
                    state[name.replace(".weight", ".expert_bias")] = torch.zeros(state[name].shape[0])
        tensors = ds.megatron_to_hf(state, shape, str(ckpt_dir))
        del state
        # The whole model is the one group this export holds (see the module docstring).
        result.max_group_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        for name in ds.hf_param_shapes(shape):
            if name in tensors:
                tensor = tensors.pop(name)
                # The expert bias stays fp32, as transformers keeps it (_keep_in_fp32_modules_strict).
                writer.add(name, tensor if name.endswith("e_score_correction_bias") else tensor.to(out_dtype))
                result.num_tensors += 1
                result.max_shard_bytes = max(result.max_shard_bytes, writer.buffer_bytes)
        result.peak_tracked_bytes = result.max_group_bytes + result.max_shard_bytes
        result.shards = writer.finish()
        result.total_bytes = writer.total_bytes
        config = config_class(
            **{**hf_kwargs, "num_experts_per_tok": default_inference_k(cfg)},
            bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"),
            dtype=str(out_dtype).replace("torch.", ""), elastic_moe=elastic_metadata(cfg, iteration))
        config.architectures = [ds.HF_CLASS_V2 if v2 else ds.HF_CLASS]
        finish_export(tmp, output, config, cfg, tok_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.experts_per_layer = [shape.num_experts if shape.is_moe_layer(i) else 0 for i in range(shape.num_layers)]
    result.seconds = time.time() - start
    return result
