"""Writing a Hugging Face model directory: safetensors shards, their index, the atomic commit.

``ShardWriter`` streams tensors into ``model-0000k-of-0000N.safetensors`` shards of at most
``max_shard_size`` bytes (one tensor when a single tensor is larger) and writes
``model.safetensors.index.json``. ``prepare_output`` checks the target and hands out a temporary
sibling directory; ``commit_output`` replaces the target with it in one rename, so a failed
conversion never leaves a half-written output. Both conversion directions use the output helpers
(``to_hf`` for the HF directory, ``from_hf`` for the Megatron checkpoint root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Tuple, Union

import torch

from megatron_elastic.convert import ConversionError, TargetExistsError


# ------------------------------------------------------------------------------ writing shards
def parse_size(size: Union[int, str]) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units as in transformers, binary with i)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ConversionError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2) or " ")
    return int(float(m.group(1)) * base ** power)


class ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever the next one would overflow.

    Shards are written under temporary names and renamed to model-0000k-of-0000N.safetensors at
    the end (N is unknown while streaming). A tensor that is a view into a larger storage is
    cloned on entry, so a queued slice never keeps a whole source tensor alive and safetensors
    never sees two entries sharing memory.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.files: List[Path] = []
        self.weight_map: Dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.buffer:
            raise RuntimeError(f"internal: tensor {name} written twice")
        t = tensor.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        elif t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        nbytes = t.numel() * t.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.buffer[name] = t
        self.buffer_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.out_dir / f".shard-{len(self.files) + 1:05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        for name in self.buffer:
            self.weight_map[name] = len(self.files)
        self.files.append(path)
        self.total_bytes += self.buffer_bytes
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> List[str]:
        self.flush()
        n = len(self.files)
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {name: names[k] for name, k in sorted(self.weight_map.items())},
        }
        index_path = self.out_dir / "model.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        # safetensors creates its files owner-only; give the shards the mode any other file of
        # this directory gets (the umask's), as save_pretrained's would have.
        mode = index_path.stat().st_mode & 0o777
        for tmp, final in zip(self.files, names):
            os.chmod(tmp, mode)
            os.replace(tmp, self.out_dir / final)
        return names


# ------------------------------------------------------------------------------ output handling
def prepare_output(output: Path, overwrite: bool, protect: Tuple[Path, ...] = ()) -> Path:
    """Check the target, return a fresh temporary sibling to write into (renamed at the end)."""
    output = Path(output)
    resolved = output.resolve()
    for p in protect:
        p = Path(p).resolve()
        if resolved == p or resolved in p.parents:
            raise ConversionError(f"output {output} would contain or replace the input {p}; choose another directory")
    if output.exists() and not overwrite:
        raise TargetExistsError(f"output {output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, output: Path) -> None:
    output = Path(output)
    if output.exists():
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        else:
            output.unlink()
    os.replace(tmp, output)
