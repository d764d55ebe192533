"""Hugging Face Mixtral / Qwen3-MoE / Qwen2-MoE / OLMoE directory -> Megatron-core distributed
checkpoint + recipe (DeepSeek-V3 directories are handed to ``deepseek_v3_io``).

The import builds the project's own ``GPTModel`` (``models/gpt.build_model``) in one process with
tensor/expert parallel size 1, copies the weights in layer by layer (safetensors are memory-mapped
and read one tensor at a time), and saves it with ``training/checkpoint.save_checkpoint``. That
makes the checkpoint's keys exactly what the trainer loads, and because a ``torch_dist`` checkpoint
stores global tensors, it loads under whatever tensor/expert-parallel layout the emitted recipe
chooses (``dist_checkpointing`` reshards on load). Memory: the Megatron model once (the save is a
single collective call over the whole state) plus the source tensors of one layer.

Everything that can be wrong with the input is checked before the model is built: the
architecture, features the Megatron model here does not express (sliding windows, attention
biases other than Qwen2-MoE's q/k/v ones, OLMoE's clip_qkv, RoPE scaling; ``hf_config.check_supported``),
every tensor's presence and shape, and tensors the mapping would silently drop.

This module orchestrates; the pieces are ``hf_config`` (config.json -> recipe), ``hf_reader``
(locating and reading the safetensors weights), ``mapping`` (hub names and layouts -> Megatron
parameters) and ``hf_writer`` (the atomic commit of the output directory).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch

from megatron_elastic.config import Config
from megatron_elastic.convert import ConversionError, ShapeMismatchError
from megatron_elastic.convert import mapping
from megatron_elastic.convert.hf_config import hf_shape, megatron_config_from_hf, read_hf_config
from megatron_elastic.convert.hf_reader import HFReadPlan, HFWeights, check_tokenizer_fits
from megatron_elastic.convert.hf_writer import commit_output, prepare_output

CONFIG_NAME = "megatron_config.yaml"


# ------------------------------------------------------------------------------ process state
@contextlib.contextmanager
def single_process_parallel():
    """torch.distributed + Megatron parallel state for one process with TP = EP = 1.

    Reuses an existing one-process setup (e.g. a caller that already initialised); a store in
    memory avoids picking a port.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_elastic import compat

    compat.enable()
    created_pg = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                f"convert_from_hf runs in one process but was launched with {dist.get_world_size()}: "
                "run it without torchrun/srun; the checkpoint it writes loads under any layout"
            )
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created_pg = True
    created_mp = False
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            expert_model_parallel_size=1,
            create_gloo_process_groups=True,
        )
        created_mp = True
    try:
        yield
    finally:
        if created_mp:
            ps.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ the tokenizer
# What save_pretrained writes for a fast tokenizer, plus the slow-tokenizer vocabulary files some
# hub directories also carry; everything else in an HF directory is the model's.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json",
                      "vocab.json", "merges.txt")
HF_TOKENIZER_DIR = "tokenizer"


def tokenizer_to_import(hf_dir: Path, output: Path):
    """``(source, destination)`` of the tokenizer the imported run trains with, or (None, None).

    A sentencepiece ``tokenizer.model`` is preferred when there is one (the project's own exports
    carry it next to tokenizer.json, and it is what they were trained with); otherwise a
    ``tokenizer.json`` makes the HF tokenizer files the run's tokenizer, in ``OUTPUT/tokenizer/``
    (a directory of its own: the checkpoint root is not a tokenizer directory). It is loaded once
    here so a tokenizer the trainer would refuse (no EOS) fails before the weights are converted.
    """
    spm_model = hf_dir / "tokenizer.model"
    if spm_model.is_file():
        return spm_model, output / "tokenizer.model"
    if (hf_dir / "tokenizer.json").is_file():
        from megatron_elastic.convert.hf_tokenizer import special_token_ids

        special_token_ids(hf_dir)  # ConversionError naming the problem and the fix
        return hf_dir, output / HF_TOKENIZER_DIR
    return None, None


def copy_tokenizer(source: Path, destination: Path) -> None:
    """Copy a sentencepiece model file, or an HF directory's tokenizer files into ``destination``."""
    if source.is_file():
        shutil.copyfile(source, destination)
        return
    destination.mkdir()
    for name in HF_TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)


# ------------------------------------------------------------------------------ the import
@dataclass
class ImportResult:
    output: Path
    checkpoint_dir: Path
    config_path: Path
    architecture: str
    config: Config
    num_tensors: int = 0
    seconds: float = 0.0


def _write_recipe(cfg: Config, path: Path, shown: Path, output: Path, hf_dir: Path) -> None:
    """Write the recipe to ``path``; ``shown`` is where it will live once the output is in place."""
    import yaml

    header = (
        f"# Megatron-elastic recipe for the model imported from {hf_dir}.\n"
        f"# The checkpoint at {output} holds its weights (iteration 0, no optimizer state):\n"
        "# checkpoint.finetune=true starts a fresh optimizer from them. Fill in the data, pick a save\n"
        "# directory and any elastic schedule, e.g.\n"
        f"#   python -m megatron_elastic.train --config {shown} \\\n"
        "#     data.data_path=[/path/to/corpus_text_document] checkpoint.save=/path/to/run \\\n"
        "#     elastic.schedule=layerwise elastic.k_min=1 elastic.k_max=4\n"
        "# The parallel section is the layout chosen at import; any other layout loads the same\n"
        "# checkpoint (it stores global tensors).\n"
    )
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def one_process_config(cfg: Config) -> Config:
    """The recipe as the conversion process builds it: unsharded (the checkpoint stores global
    tensors, so it loads under the layout the recipe records)."""
    c = copy.deepcopy(cfg)
    c.parallel.tensor_model_parallel_size = c.parallel.expert_model_parallel_size = 1
    c.parallel.expert_tensor_parallel_size = 1
    c.parallel.sequence_parallel = False
    return c


def write_import(hf_dir: Path, output: Path, cfg: Config, vocab_size: int, tokenizers: tuple,
                 model_tensors: Callable[[torch.nn.Module], Dict[str, torch.Tensor]],
                 expected: Dict[str, Tuple[int, ...]], tensors: Callable[[], Iterator[Tuple[str, torch.Tensor]]],
                 *, config_out=None, overwrite: bool = False, use_te: Optional[bool] = None) -> Tuple[Path, int]:
    """What every architecture's import shares once its inputs are checked: build the model in one
    process, copy ``tensors()`` (Megatron name, value) into ``model_tensors(model)`` (which must
    name exactly ``expected``), save it as iteration 0 with the tokenizer (``tokenizers``: source
    and destination from ``tokenizer_to_import``) and the recipe, and commit the directory
    atomically (nothing is left at ``output`` on failure). Returns (recipe path, tensors copied)."""
    from megatron_elastic.device import seed_all
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import save_checkpoint

    tokenizer, final_tokenizer = tokenizers
    tmp = prepare_output(output, overwrite, protect=(hf_dir,))
    try:
        with single_process_parallel():
            seed_all(cfg.train.seed)
            model = build_model(one_process_config(cfg), vocab_size, use_te=use_te)
            state = model_tensors(model)
            if set(state) != set(expected):
                extra, lacking = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
                raise RuntimeError(f"internal: model tensors differ from the mapping: extra {extra[:3]}, "
                                   f"missing {lacking[:3]}")
            num = 0
            with torch.no_grad():
                for name, value in tensors():
                    target = state.pop(name)
                    if tuple(value.shape) != tuple(target.shape):
                        raise ShapeMismatchError(f"shape mismatch for {name}: converted {tuple(value.shape)}, "
                                                 f"model {tuple(target.shape)}")
                    target.copy_(value)
                    num += 1
            if state:
                raise RuntimeError(f"internal: tensors left unset: {sorted(state)[:5]}")
            save_checkpoint(tmp, model, None, cfg, 0)
            del model
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp / final_tokenizer.relative_to(output))
        recipe = Path(config_out) if config_out else output / CONFIG_NAME
        _write_recipe(cfg, tmp / CONFIG_NAME, recipe, output, hf_dir)
        commit_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if config_out:
        recipe.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output / CONFIG_NAME, recipe)
    return recipe, num


def convert_hf_to_megatron(
    hf_dir: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    tensor_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    config_out: Union[None, str, os.PathLike] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Write a Megatron checkpoint root at ``output`` (tracker + iter_0000000 + recipe YAML)."""
    from tqdm import tqdm

    start = time.time()
    hf_dir, output = Path(hf_dir), Path(output)
    raw = read_hf_config(hf_dir)
    source = str(hf_dir / "config.json")
    arch = mapping.architecture_from_hf_config(raw, source)
    if arch in ("deepseek_v3", "deepseek_v2"):  # multi-latent attention: its own module (convert/deepseek_v3_io.py)
        from megatron_elastic.convert.deepseek_v3_io import import_deepseek_v3

        return import_deepseek_v3(hf_dir, output, tensor_model_parallel_size=tensor_model_parallel_size,
                                  expert_model_parallel_size=expert_model_parallel_size, config_out=config_out,
                                  overwrite=overwrite, progress=progress)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(hf_dir))
    tokenizer, final_tokenizer = tokenizer_to_import(hf_dir, output)
    cfg = megatron_config_from_hf(hf, arch, output.resolve(), tensor_model_parallel_size,
                                  expert_model_parallel_size, final_tokenizer.resolve() if final_tokenizer else None,
                                  source)
    shape = hf_shape(hf, arch)
    check_tokenizer_fits(hf_dir, shape.vocab_size)
    weights = HFWeights(hf_dir)
    plan = HFReadPlan(weights, shape)  # every tensor located and shape-checked before building

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        yield "embedding.word_embeddings.weight", plan.get("model.embed_tokens.weight")
        for i in tqdm(range(shape.num_layers), desc="HF -> Megatron", unit="layer",
                      disable=not progress, dynamic_ncols=True):
            yield from mapping.hf_to_megatron_layer(plan.get, plan.get_expert, shape, i).items()
            plan.release()
        yield "decoder.final_layernorm.weight", plan.get("model.norm.weight")
        if not shape.tied_embeddings:
            yield "output_layer.weight", plan.get("lm_head.weight")
        weights.close()

    def parameters(model) -> Dict[str, torch.Tensor]:
        return {mapping.canonical_param_name(n): p for n, p in model.named_parameters()}

    recipe, num = write_import(hf_dir, output, cfg, shape.vocab_size, (tokenizer, final_tokenizer), parameters,
                               mapping.megatron_param_shapes(shape), tensors, config_out=config_out,
                               overwrite=overwrite)
    return ImportResult(output=output, checkpoint_dir=output / "iter_0000000", config_path=recipe,
                        architecture=arch, config=cfg, num_tensors=num, seconds=time.time() - start)
