"""Chat data for training: one conversation per sequence, loss on the assistant tokens only.

On disk (``data/chat_preprocess.py``): ``<prefix>.bin/.idx`` hold each conversation's token ids
as one document of a Megatron indexed dataset, ``<prefix>.loss_mask.bin/.idx`` hold its
per-token mask (1 = assistant turn, end-of-turn token included) as the same document of a second
one, and ``<prefix>.meta.json`` says ``"dataset_type": "chat"``.

``ChatDataset`` is a megatron-core ``MegatronDataset``, built by ``BlendedMegatronDatasetBuilder``
like ``GPTDataset`` (splits, blends, weights and held-out sets work the same way). A sample is one
conversation: its first ``seq_length + 1`` tokens give ``tokens`` and ``labels`` (shifted by one),
``loss_mask[j]`` is the mask of ``labels[j]`` (the loss counts predicting an assistant token),
and the rest of the sequence is padding (the tokenizer's pad id, else its EOD) with
``loss_mask`` 0 and ``padding_mask`` True. No packing: the local spec's core attention
(``models/attention.py``, ``SDPAttention``) refuses megatron-core's ``packed_seq_params`` and
applies a plain causal mask, so two conversations in one sequence would attend to each other;
with one per sequence, causal attention never lets a real token see the padding after it.
Longer conversations are truncated; every dataset counts them (``report``) and the trainer
prints the count at start.

Samples are drawn as epochs of seeded permutations of the split's conversations (one epoch when
megatron-core asks for no fixed size: held-out sets), so the order depends on the seed only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset

from megatron_elastic.config import ConfigError

TEXT, CHAT = "text", "chat"
MASK_SUFFIX = ".loss_mask"


def mask_prefix(prefix: str) -> str:
    """The loss-mask dataset's prefix for the chat token dataset at ``prefix``."""
    return f"{prefix}{MASK_SUFFIX}"


def dataset_type_of(prefix: str) -> str:
    """``chat`` when ``prefix`` has loss-mask files (or its record says chat), else ``text``."""
    from megatron_elastic.data.meta import read_meta

    files = [Path(mask_prefix(prefix) + ext) for ext in (".bin", ".idx")]
    record = read_meta(prefix) or {}
    if record.get("dataset_type") == CHAT or any(f.is_file() for f in files):
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{prefix} is chat data but {', '.join(missing)} is missing: copy the "
                              "loss-mask files with the data, or re-run tools/preprocess_data.py --chat")
        return CHAT
    return TEXT


def resolve_dataset_type(cfg, prefixes: Dict[str, List[str]]) -> str:
    """The one dataset type of every prefix (``{config key: prefixes}``), checked against
    ``data.dataset_type``; a blend of chat and text data is refused."""
    found = {key: {p: dataset_type_of(p) for p in ps} for key, ps in prefixes.items()}
    kinds = {kind for by_prefix in found.values() for kind in by_prefix.values()}
    if len(kinds) > 1:
        chat = next(f"{k}: {p}" for k, ps in found.items() for p, t in ps.items() if t == CHAT)
        text = next(f"{k}: {p}" for k, ps in found.items() for p, t in ps.items() if t == TEXT)
        raise ConfigError(
            f"chat and text data in one run ({chat} is chat data with a loss mask, {text} is text): "
            "a run trains on one kind; preprocess the text as chat (tools/preprocess_data.py --chat), "
            "or train on the two in separate runs"
        )
    kind = kinds.pop() if kinds else TEXT
    wanted = cfg.data.dataset_type
    if wanted is not None and wanted != kind:
        example = next(p for ps in prefixes.values() for p in ps)
        raise ConfigError(
            f"data.dataset_type={wanted} but {example} is {kind} data"
            + (" (no loss-mask files): preprocess it with tools/preprocess_data.py --chat"
               if wanted == CHAT else " (it has a loss mask)")
            + ", or set data.dataset_type=null to follow the data"
        )
    return kind


class ChatDocuments:
    """The low-level dataset: token and loss-mask indexed datasets with the same documents."""

    def __init__(self, prefix: str, mmap: bool = True):
        self.prefix = prefix
        self.tokens = IndexedDataset(prefix, mmap=mmap)
        self.mask = IndexedDataset(mask_prefix(prefix), mmap=mmap)
        if not numpy.array_equal(self.tokens.sequence_lengths, self.mask.sequence_lengths):
            raise ConfigError(
                f"{prefix}: the loss mask ({mask_prefix(prefix)}) does not have the token data's "
                f"documents ({len(self.mask)} vs {len(self.tokens)} documents, or other lengths): "
                "the files come from different runs; re-run tools/preprocess_data.py --chat"
            )

    def __len__(self) -> int:
        return len(self.tokens)


class ChatDataset(MegatronDataset):
    """One conversation per sample, padded to ``seq_length``; see the module docstring."""

    def __init__(self, dataset: ChatDocuments, dataset_path: Optional[str], indices: numpy.ndarray,
                 num_samples: Optional[int], index_split, config) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.seq_length = config.sequence_length
        pad = self._pad_token_id
        self.pad_id = pad if pad is not None and pad >= 0 else config.tokenizer.eod
        n = len(indices)
        if n == 0:
            self.sample_index = numpy.zeros(0, dtype=numpy.int64)
        else:
            epochs = 1 if num_samples is None else max(1, math.ceil(num_samples / n))
            rng = numpy.random.RandomState(config.random_seed)
            self.sample_index = numpy.concatenate([rng.permutation(indices) for _ in range(epochs)])
        self.report = self._truncation_report(indices)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: ChatDocuments) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config) -> ChatDocuments:
        return ChatDocuments(dataset_path, mmap=config.mmap_bin_files)

    def __len__(self) -> int:
        return len(self.sample_index)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        doc = int(self.sample_index[idx])
        length = self.seq_length
        take = min(int(self.dataset.tokens.sequence_lengths[doc]), length + 1)
        ids = self.dataset.tokens.get(doc, offset=0, length=take).astype(numpy.int64)
        mask = self.dataset.mask.get(doc, offset=0, length=take)
        tokens = numpy.full(length, self.pad_id, dtype=numpy.int64)
        labels = numpy.full(length, self.pad_id, dtype=numpy.int64)
        loss_mask = numpy.zeros(length, dtype=numpy.float32)
        n = take - 1
        tokens[:n] = ids[:-1]
        labels[:n] = ids[1:]
        loss_mask[:n] = mask[1:]  # the loss of predicting labels[j] counts iff it is an assistant token
        padding = torch.zeros(length, dtype=torch.bool)
        padding[n:] = True
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask),
                "position_ids": torch.arange(length, dtype=torch.int64),
                # Positions past the conversation: routed like any token, but not data, so
                # routing statistics leave them out (the loss mask already does).
                "padding_mask": padding}

    def _truncation_report(self, indices: numpy.ndarray) -> str:
        """One line: conversations in this split, how many are cut at ``seq_length + 1`` tokens
        and what that costs (tokens and assistant tokens dropped, samples left with no loss)."""
        window = self.seq_length + 1
        lengths = self.dataset.tokens.sequence_lengths[indices].astype(numpy.int64)
        n = len(lengths)
        long = numpy.asarray(indices)[lengths > window]
        lost_tokens = int((lengths[lengths > window] - window).sum())
        lost_assistant = no_loss = 0
        for doc in long:
            mask = self.dataset.mask[int(doc)]
            lost_assistant += int(mask[window:].sum())
            no_loss += int(mask[1:window].sum() == 0)
        padding = float((self.seq_length - (numpy.minimum(lengths, window) - 1)).sum()) / max(1, n * self.seq_length)
        return (f"chat data {self.dataset.prefix} ({self.index_split.name}): {n} conversations, "
                f"{len(long)} longer than seq_length+1={window} tokens and truncated ({lost_tokens} tokens "
                f"dropped, {lost_assistant} of them assistant tokens; {no_loss} keep no assistant token), "
                f"padding {padding:.0%} of positions")
