"""What the two conversion command lines share (``tools/convert_to_hf.py``, ``tools/convert_from_hf.py``).

Module-level imports stay light (stdlib only): Megatron's checkpoint writer may spawn helper
processes that re-import the calling tool as ``__main__``.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, TypeVar

EXIT_OK = 0
EXIT_USER_ERROR = 2  # a conversion error, a bad config or a damaged checkpoint: one line on stderr

T = TypeVar("T")


def quiet_megatron_imports() -> None:
    """Megatron-core announces its fallbacks on every import; they do not affect conversion."""
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def run_conversion(prog: str, convert: Callable[[], T]) -> Optional[T]:
    """``convert()``'s result, or None after printing ``<prog>: error: <message>`` on stderr when
    it fails with a user error (the tool then exits with ``EXIT_USER_ERROR``)."""
    from megatron_elastic.config import ConfigError
    from megatron_elastic.convert import ConversionError
    from megatron_elastic.training.checkpoint import CheckpointError

    try:
        return convert()
    except (ConversionError, ConfigError, CheckpointError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None
