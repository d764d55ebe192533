"""Chat test material shared by tests/data and tests/launchers: a byte-level BPE tokenizer with a
ChatML chat template, saved as a Hugging Face directory, and small chat jsonl files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from test_hf_tokenizer_data import EOS, _stdlib_text, save_byte_level_bpe

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen's templates render it (without their default system prompt and tool calls).
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def save_chat_tokenizer(directory: Path, texts: List[str] = None, chat_template: str = CHATML) -> Path:
    """An 800-entry byte-level BPE with <|im_start|>/<|im_end|> as special tokens and a chat
    template, written by save_pretrained (EOS <|endoftext|>, pad <pad>)."""
    texts = texts if texts is not None else _stdlib_text(200_000)
    extra = {"chat_template": chat_template} if chat_template else {}
    return save_byte_level_bpe(directory, texts, extra_special_tokens=(IM_START, IM_END),
                               eos_token=EOS, pad_token="<pad>", **extra)


def chat_records(n: int, seed: int = 0) -> List[dict]:
    """``n`` conversations in both accepted forms: multi-turn ``messages`` (some with a system
    message) and ``prompt``/``response`` pairs; replies follow a learnable rule (the reply
    repeats the question's words reversed), so a short fine-tune can lower their loss."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta sigma omega kappa lambda theta zeta".split()
    out = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        answer = " ".join(reversed(question.split()))
        if i % 3 == 0:
            out.append({"prompt": f"reverse: {question}", "response": answer})
        else:
            messages = [{"role": "system", "content": "You reverse words."}] if i % 3 == 2 else []
            messages += [{"role": "user", "content": f"reverse: {question}"},
                         {"role": "assistant", "content": answer},
                         {"role": "user", "content": "again, twice"},
                         {"role": "assistant", "content": f"{answer} {answer}"}]
            out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
