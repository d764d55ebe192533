"""What the trainer reads: Megatron indexed datasets, addressed micro-batches, vocabulary checks.

Datasets come from megatron-core's blended dataset builder: ``GPTDataset`` for text, or
``data/chat_dataset.ChatDataset`` for chat data (one conversation per sequence, loss on assistant
tokens; ``data.dataset_type``, by default read from the data); ``check_vocabulary``
refuses, before the model is built, a tokenizer or data whose ids do not fit the model.

``data.data_path`` uses Megatron-LM's blend syntax (``[prefix]`` or ``[w1, p1, w2, p2, ...]``) and
``data.split`` its train/valid/test split string, so data prepared for Megatron-LM works as is.

Batches are addressed, not streamed: the samples of (iteration i, micro-batch m) on data-parallel
rank r are ``i*G + m*(b*D) + r*b + [0, b)`` (G global batch, b micro-batch, D data-parallel
size), Megatron's pretraining-sampler order. The data position in a checkpoint is therefore just
the iteration, and a resumed run reads exactly the samples the uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.data.chat_dataset import CHAT, TEXT, ChatDataset, resolve_dataset_type


def parse_blend(data_path: List, key: str = "data.data_path") -> Tuple[List[str], Optional[List[float]]]:
    """Megatron blend list -> (prefixes, weights). Accepts [p], [p1, p2] or [w1, p1, w2, p2]."""
    items = [str(x) for x in data_path]
    if not items:
        raise ConfigError(f"{key} is empty: give one or more dataset prefixes (.bin/.idx)")
    def is_number(x: str) -> bool:
        try:
            float(x)
            return True
        except ValueError:
            return False
    if len(items) % 2 == 0 and all(is_number(items[i]) for i in range(0, len(items), 2)):
        weights = [float(items[i]) for i in range(0, len(items), 2)]
        prefixes = [items[i] for i in range(1, len(items), 2)]
    else:
        weights, prefixes = None, items
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise ConfigError(
                    f"{key}: {prefix}{ext} not found on this node; the prefix must name an "
                    "indexed dataset written by tools/preprocess_data.py (without the extension)"
                )
    return prefixes, weights


def data_blends(cfg: Config) -> Dict[str, Tuple[List[str], Optional[List[float]]]]:
    """``{config key: (prefixes, weights)}`` for ``data.data_path`` and the held-out paths set."""
    blends = {"data.data_path": parse_blend(cfg.data.data_path)}
    for key in ("valid_data_path", "test_data_path"):
        if getattr(cfg.data, key):
            blends[f"data.{key}"] = parse_blend(getattr(cfg.data, key), f"data.{key}")
    return blends


def build_datasets(cfg: Config, tokenizer, data_parallel_size: int):
    """Build (train, valid, test) GPTDatasets sized for the whole run.

    With ``data.valid_data_path`` (and optionally ``data.test_data_path``) the evaluation sets
    are whole separate data sets (one pass, shuffled by ``data.valid_seed`` only); otherwise the
    three come from ``data.split`` of ``data.data_path`` as in Megatron-LM.
    """
    t, d = cfg.train, cfg.data
    num_evals = t.train_iters // t.eval_interval + 1 if t.eval_interval else 1
    sizes = [
        t.train_iters * t.global_batch_size,
        max(1, num_evals * t.eval_iters * t.global_batch_size),
        max(1, t.eval_iters * t.global_batch_size),
    ]
    blends = data_blends(cfg)
    kind = resolve_dataset_type(cfg, {key: blend[0] for key, blend in blends.items()})
    if not d.valid_data_path:
        datasets = _build(cfg, tokenizer, sizes, t.seed, kind, blend=blends["data.data_path"], split=d.split)
    else:
        train = _build(cfg, tokenizer, [sizes[0], None, None], t.seed, kind,
                       blend_per_split=[blends["data.data_path"], None, None])[0]
        # Size None: every sample once, in an order that depends on valid_seed and the data only.
        held_out = [None, blends["data.valid_data_path"], blends.get("data.test_data_path")]
        _, valid, test = _build(cfg, tokenizer, [None, None, None], d.valid_seed, kind,
                                blend_per_split=held_out)
        datasets = [train, valid, test]
    if kind == CHAT:
        _print_chat_reports(datasets)
    return tuple(datasets)


def _print_chat_reports(datasets) -> None:
    """Rank 0 prints each chat dataset's truncation line (``ChatDataset.report``)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for dataset in datasets:
        for part in getattr(dataset, "datasets", [dataset]):  # a BlendedDataset's parts, or itself
            if isinstance(part, ChatDataset):
                print(part.report, flush=True)


def _build(cfg: Config, tokenizer, sizes, seed: int, kind: str = TEXT, blend=None, split=None,
           blend_per_split=None):
    ds_config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.model.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cfg.data.cache_path,
        mmap_bin_files=cfg.data.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    cls = ChatDataset if kind == CHAT else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, ds_config).build()


class BatchReader:
    """Reads this rank's micro-batches by (iteration, micro-batch) address."""

    def __init__(self, dataset, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int):
        if dataset is None:
            raise ConfigError(
                "a dataset split is empty: data.split gives it no documents; adjust data.split "
                "(e.g. 949,50,1) or add data"
            )
        if len(dataset) == 0:
            raise ConfigError(
                "a dataset split has no samples: data.split gives it no documents (or "
                "conversations); adjust data.split (e.g. 90,10,0) or add data"
            )
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.gbs = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)

    def sample_offset(self, microbatch: int) -> int:
        """Index within the global batch of this rank's first sample in ``microbatch``."""
        return microbatch * self.mbs * self.dp_size + self.dp_rank * self.mbs

    def get(self, iteration: int, microbatch: int) -> Dict[str, torch.Tensor]:
        start = iteration * self.gbs + self.sample_offset(microbatch)
        n = len(self.dataset)
        samples = [self.dataset[(start + j) % n] for j in range(self.mbs)]
        batch = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = torch.stack([_as_tensor(s[key]) for s in samples])
        if "padding_mask" in samples[0]:  # chat data: [b, s], True past each conversation
            batch["padding_mask"] = torch.stack([_as_tensor(s["padding_mask"]) for s in samples])
        return batch


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.asarray(x))


def model_vocab_size(cfg: Config, tokenizer_vocab_size: int) -> int:
    """The embedding rows the model gets: model.vocab_size, else the tokenizer's size padded."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from megatron_elastic.models.gpt import padded_vocab_size

    return padded_vocab_size(tokenizer_vocab_size, cfg.model.make_vocab_size_divisible_by,
                             cfg.parallel.tensor_model_parallel_size)


def check_data(cfg: Config, tokenizer) -> int:
    """Refuse, before the model is built, data the run cannot use: a blend of chat and text data
    or one that contradicts ``data.dataset_type`` (``resolve_dataset_type``), and token ids that
    do not fit the model (``check_vocabulary``). Returns the model's vocabulary size."""
    resolve_dataset_type(cfg, {key: blend[0] for key, blend in data_blends(cfg).items()})
    return check_vocabulary(cfg, tokenizer)


def check_vocabulary(cfg: Config, tokenizer) -> int:
    """Refuse, before the model is built, a tokenizer or data whose ids do not fit the model.

    The tokenizer must have at most as many pieces as the model has embedding rows, and every
    dataset's largest token id must be below that: from the ``<prefix>.meta.json`` that
    tools/preprocess_data.py writes, else from a sample of the ``.bin`` (data from other tools).
    Returns the model's vocabulary size.
    """
    from megatron_elastic.data.meta import dataset_token_range

    vocab = model_vocab_size(cfg, tokenizer.vocab_size)
    if tokenizer.vocab_size > vocab:
        raise ConfigError(
            f"data.tokenizer_model={cfg.data.tokenizer_model} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={vocab}: set model.vocab_size >= {tokenizer.vocab_size} (or null to "
            "use the tokenizer's size, padded)"
        )
    prefixes = [prefix for blend_prefixes, _ in data_blends(cfg).values() for prefix in blend_prefixes]
    for prefix in prefixes:
        found = dataset_token_range(prefix)
        if found.max_token_id < vocab:
            continue
        if found.source == "sidecar":
            origin = (f"(per {prefix}.meta.json: tokenized with {found.tokenizer_model}, "
                      f"{found.vocab_size} pieces)")
        else:
            origin = f"(found in a sample of {found.tokens_read} tokens of {prefix}.bin)"
        raise ConfigError(
            f"data.data_path: {prefix} holds token id {found.max_token_id} {origin} but the model "
            f"vocabulary has {vocab} entries (ids 0..{vocab - 1}): re-run tools/preprocess_data.py "
            f"with data.tokenizer_model={cfg.data.tokenizer_model}, or set model.vocab_size > "
            f"{found.max_token_id}"
        )
    return vocab
