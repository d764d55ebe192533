"""Conversations -> token ids and a per-token loss mask, through the tokenizer's chat template.

One conversation is a jsonl object with ``messages`` (a list of ``{"role": "system" | "user" |
"assistant", "content": str}``) or a ``prompt``/``response`` pair (optionally ``system``), which
is read as ``[system,] user, assistant``. The conversation is rendered to text with a Jinja chat
template (megatron-core's tokenizer library: ``apply_chat_template`` of a Hugging Face tokenizer,
whose template variables such as ``bos_token`` are filled in, or ``MegatronTokenizerChatTemplate``
for a sentencepiece model given a template file).

Which tokens carry the loss: those of each assistant turn as the template renders it, i.e. the
text between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``
for every assistant message i: the reply and the template's end-of-turn marker (e.g.
``<|im_end|>\\n``), not the role header the generation prompt already holds. This works with any
template whose renderings of a conversation's prefixes are prefixes of the whole rendering; a
template that rewrites earlier turns once later ones follow (Qwen3's drops the ``<think>`` block of
earlier assistant turns) is refused with the conversation's line: split such conversations into
one per assistant turn, or pass a prefix-stable template (``--chat-template``).

Tokenization is per segment (the text before an assistant turn, the turn, ...), so the mask is
exact whatever the tokenizer merges, and a prompt is tokenized as it is at inference, where the
generation prompt is encoded alone and the reply is generated after it. Segments concatenate to
the rendered text: ``decode(ids)`` (special tokens kept) is the rendering, character for character.

Sentencepiece ``.model`` files carry no chat template: chat data with one needs ``--chat-template``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from megatron_elastic.data.documents import DataError

ROLES = ("system", "user", "assistant")


def conversation_from_record(record: dict, where: str) -> List[dict]:
    """The messages of one jsonl object (``messages``, or ``prompt``/``response`` [+ ``system``])."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for n, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{where}: messages[{n}] must be an object with 'role' and 'content'")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise DataError(f"{where}: messages[{n}] has role {role!r}; allowed: {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise DataError(f"{where}: messages[{n}].content is {type(content).__name__}, expected a string")
            out.append({"role": role, "content": content})
    elif "prompt" in record and "response" in record:
        out = []
        for key in ("system", "prompt", "response"):
            if key in record and not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} is {type(record[key]).__name__}, expected a string")
        if "system" in record:
            out.append({"role": "system", "content": record["system"]})
        out += [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    else:
        keys = ", ".join(sorted(map(repr, record))) or "none"
        raise DataError(f"{where}: a conversation needs 'messages' (a list of {{role, content}}) or "
                        f"'prompt' and 'response' (keys present: {keys})")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message, so no token would "
                        "carry a loss; add the reply or drop the line")
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template bound to a tokenizer: ``render`` and where it came from."""

    text: str
    source: str  # "tokenizer <dir>" or the template file
    tokenizer: object

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        if hasattr(self.tokenizer, "hf_tokenizer"):
            # Hugging Face: its renderer passes bos_token/eos_token etc. to the template.
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.text, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        else:
            from megatron.core.tokenizers.text.libraries.chat_template import MegatronTokenizerChatTemplate

            text = MegatronTokenizerChatTemplate().apply_chat_template(
                messages, self.text, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):
            raise DataError(f"chat template of {self.source} rendered {type(text).__name__}, not text")
        return text


def load_chat_template(tokenizer, template_file: Optional[Path] = None) -> ChatTemplate:
    """``template_file`` (a Jinja file) if given, else the Hugging Face tokenizer's own template.

    Raises:
        DataError: no template (a sentencepiece model, or a Hugging Face tokenizer without one).
    """
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise DataError(f"--chat-template {path}: no such file (a Jinja chat template)")
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path), tokenizer)
    text = getattr(tokenizer, "chat_template", None) if hasattr(tokenizer, "hf_tokenizer") else None
    if not text:
        kind = ("Hugging Face tokenizer" if hasattr(tokenizer, "hf_tokenizer")
                else "sentencepiece model")
        raise DataError(
            f"{kind} {tokenizer.path} has no chat template: pass --chat-template FILE (a Jinja "
            "template, e.g. the base model's chat_template.jinja), or use a Hugging Face tokenizer "
            "directory that has one (chat_template in tokenizer_config.json or chat_template.jinja)"
        )
    return ChatTemplate(text, f"tokenizer {tokenizer.path}", tokenizer)


def assistant_spans(template: ChatTemplate, messages: List[dict], where: str) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans of its assistant turns."""
    def render(part: List[dict], generation_prompt: bool = False) -> str:
        try:
            return template.render(part, add_generation_prompt=generation_prompt)
        except DataError:
            raise
        except Exception as exc:  # Jinja errors, incl. a template's own raise_exception(...)
            what = "the conversation" if len(part) == len(messages) else f"its first {len(part)} message(s)"
            raise DataError(f"{where}: the chat template of {template.source} cannot render {what} "
                            f"({type(exc).__name__}: {exc}); fix the conversation (e.g. the roles' "
                            "order the template expects) or pass another --chat-template") from None

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], generation_prompt=True)
        upto = render(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{where}: the chat template of {template.source} renders assistant message {i} "
                "differently once later messages follow (or its generation prompt is not where "
                "the reply starts), so the reply's tokens cannot be located: split the "
                "conversation into one per assistant turn, or pass --chat-template with a "
                "template whose renderings of a conversation's prefixes are prefixes of it"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_conversation(tokenizer, template: ChatTemplate, messages: List[dict],
                        where: str) -> Tuple[List[int], List[int]]:
    """Token ids of the rendered conversation and their loss mask (1 = assistant turn)."""
    text, spans = assistant_spans(template, messages, where)
    ids: List[int] = []
    mask: List[int] = []
    position = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, flag in ((text[position:start], 0), (text[start:end], 1)):
            if piece:
                encoded = tokenizer.encode(piece)
                ids += encoded
                mask += [flag] * len(encoded)
        position = end
    if not any(mask):
        raise DataError(f"{where}: the assistant turns render to no tokens (empty replies?); "
                        "drop the line or give the replies text")
    return ids, mask
