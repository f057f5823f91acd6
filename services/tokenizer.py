"""The lab's tokenizer: one token per UTF-8 byte of the text, so it works offline, with no
vocabulary file, and the same everywhere; and the content keys of a prompt's KV blocks.

The emulated model has no weights: what matters of a prompt is how many tokens it has and
which of its blocks equal another prompt's. Bytes give both exactly: equal prefixes are equal
token prefixes, hence equal block keys, hence the same stored blocks. A block's key chains the
key before it (as vLLM's and LMCache's block hashes do), so it names its whole prefix. The HF
`tokenizers`-format file a benchmark client needs to count the same tokens is written by
`tokenizer_json()` (`dualpath tokenizer DIR`). Pure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from dualpath.errors import DualPathError

KEY_BITS = 63
_ROOT = b"dualpath-token-block-v1"
_FILLER = b"the quick brown fox jumps over the lazy dog "
"""What the emulated model 'generates': its bytes in turn, one token each."""
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


class PromptError(DualPathError, ValueError):
    """A prompt or a chat message list the tokenizer cannot take; the text names the field."""


def encode(text: str) -> bytes:
    """The tokens of `text`: its UTF-8 bytes."""
    return text.encode("utf-8")


def block_keys(tokens: bytes, block_tokens: int) -> tuple[int, ...]:
    """One key per full block of `block_tokens` tokens (the partial tail has none): 63 bits
    of BLAKE2b over the previous key and the block's tokens."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    keys: list[int] = []
    prev = _ROOT
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        prev = hashlib.blake2b(prev + tokens[start : start + block_tokens], digest_size=8).digest()
        keys.append(int.from_bytes(prev, "big") >> (64 - KEY_BITS))
    return tuple(keys)


def generated_text(first: int, count: int) -> str:
    """Tokens `first` .. `first + count - 1` (0-based) of what the model emits, as text:
    ASCII, one byte per token, the same for every request."""
    n = len(_FILLER)
    return bytes(_FILLER[(first + i) % n] for i in range(count)).decode("ascii")


def chat_prompt(messages: Any) -> str:
    """A chat's messages as one prompt, by a fixed template: each message as
    `<|role|>` + newline + content + newline, then `<|assistant|>` + newline. A conversation that
    goes on therefore extends its earlier prompt, and its blocks are hits."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages: must be a non-empty list of {role, content} objects")
    parts: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise PromptError(f"messages[{i}]: must be an object with role and content")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise PromptError(f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}")
        parts.append(f"<|{role}|>\n{_content(m.get('content'), i)}\n")
    return "".join(parts) + "<|assistant|>\n"


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is understood
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise PromptError(f"messages[{i}].content[{j}]: only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"messages[{i}].content[{j}].text: must be a string")
            texts.append(text)
        return "".join(texts)
    if content is None:
        return ""
    raise PromptError(f"messages[{i}].content: must be a string or a list of text parts")


def completion_prompt(prompt: Any) -> bytes:
    """The tokens of a completions request's `prompt`: a string, a list of one string, or a
    list of token ids (bytes, 0-255)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode(prompt)
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 256 for t in prompt
    ):
        return bytes(prompt)
    raise PromptError(
        "prompt: must be a string, a list of one string, or a list of token ids 0-255"
        " (batched prompts are not supported)"
    )


def tokenizer_json() -> dict[str, Any]:
    """The same tokenizer as a HuggingFace `tokenizers` file (tokenizer.json): a vocabulary
    of the 256 bytes (ByteLevel's printable stand-ins), no merges, so every byte of a text is
    one token and decoding gives the bytes back."""
    vocab = {ch: i for i, ch in enumerate(_byte_chars())}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def tokenizer_files() -> Mapping[str, str]:
    """The files of a tokenizer directory a HuggingFace-style client loads offline."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    return {
        "tokenizer.json": json.dumps(tokenizer_json(), ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config),
    }


def _byte_chars() -> Sequence[str]:
    """GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others map
    to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
