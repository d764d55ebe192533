"""Fixtures of the conversion tests (tests/convert).

The expensive part runs once per session (fixture ``conv``, shared by test_export.py and
test_import.py): random Mixtral and Qwen3-MoE models built from configs through the transformers
classes, the import CLI on one of them, then two process launches:

* one process: the 1-rank reference of the expert-parallel model (also saved in a TP=2 sharded
  layout), two QK-norm models (one per router normalisation) saved as checkpoints with their
  logits, the Mixtral import, both imported models' logits, and a model spanning many shards for
  the memory check;
* two processes (expert parallel size 2): a model built and saved under EP=2 (iteration 0) with its
  logits at several k, then a few steps of an elastic recipe from the imported Mixtral checkpoint,
  saved at iteration 2 and reloaded for its logits.

Fixture ``archs`` does the same for the architectures beyond Mixtral / Qwen3-MoE (see its
docstring). Everything on the Hugging Face side (exports, transformers models, comparisons) runs in
the test process. The builders and workers live in conversion_helpers.py.
"""

from __future__ import annotations

import json

import pytest

from conversion_helpers import (
    ARCH_BUILDERS,
    ARCH_K_CHECKS,
    MAX_DIFFS,
    arch_ep2_work,
    arch_import_work,
    ep2_work,
    hf_mixtral,
    hf_model_logits,
    hf_qwen3,
    single_process_work,
)
from helpers import run_distributed, run_tool


@pytest.fixture(scope="session")
def conv(smoke_data, tmp_path_factory):
    from megatron_elastic.convert.hf_tokenizer import save_hf_tokenizer

    root = tmp_path_factory.mktemp("hf_conversion")
    hf_logits = {}
    for name, model in (("mixtral", hf_mixtral()), ("qwen3", hf_qwen3())):
        directory = root / f"hf_{name}"
        model.save_pretrained(str(directory))
        save_hf_tokenizer(smoke_data["tokenizer"], directory)
        hf_logits[name] = {json.dumps(k): hf_model_logits(model, k) for k in (None, 1)}
    # The import CLI (one real command line, with its progress bar); Mixtral goes through the library.
    proc = run_tool("tools/convert_from_hf.py", "--hf-dir", str(root / "hf_qwen3"), "--output",
                    str(root / "imported_qwen3"), "--config-out", str(root / "qwen3_recipe.yaml"))
    assert "imported qwen3_moe" in proc.stdout and "HF -> Megatron" in proc.stderr
    single = run_distributed(single_process_work, 1, smoke_data, str(root), tmp_dir=root)[0]
    ep2 = run_distributed(ep2_work, 2, smoke_data, str(root), tmp_dir=root)
    return {"root": root, "data": smoke_data, "hf": hf_logits, "single": single, "ep2": ep2}


@pytest.fixture(scope="session")
def archs(smoke_data, tmp_path_factory):
    """Qwen2-MoE (gated shared expert, q/k/v biases, a dense layer), OLMoE (projection-wide
    QK-norm) and Qwen3-MoE with dense layers: random models through the transformers classes,
    their logits at every k check, imported in one process (recipes for expert parallel 2), then
    loaded, evaluated and re-saved under expert parallel 2 with an elastic run from the Qwen2-MoE
    import (``arch_ep2_work``). The exports and comparisons run in the test process."""
    from megatron_elastic.convert.hf_tokenizer import save_hf_tokenizer

    root = tmp_path_factory.mktemp("hf_architectures")
    hf_logits = {}
    for name, build in ARCH_BUILDERS.items():
        model = build()
        model.save_pretrained(str(root / f"hf_{name}"))
        save_hf_tokenizer(smoke_data["tokenizer"], root / f"hf_{name}")
        hf_logits[name] = {json.dumps(k): hf_model_logits(model, k) for k in ARCH_K_CHECKS[name]}
    run_distributed(arch_import_work, 1, str(root), tmp_dir=root)
    ep2 = run_distributed(arch_ep2_work, 2, smoke_data, str(root), tmp_dir=root)
    return {"root": root, "hf": hf_logits, "ep2": ep2}


@pytest.fixture(scope="session", autouse=True)
def _report_diffs():
    yield
    if MAX_DIFFS:
        print("\nmax |logit difference| per check:")
        for name, diff in sorted(MAX_DIFFS.items()):
            print(f"  {name}: {diff:.3e}")
