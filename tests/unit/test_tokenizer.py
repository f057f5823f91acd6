"""The lab's tokenizer (services/tokenizer.py): a token per UTF-8 byte, block keys that name
their prefix, the chat template, prompt errors naming the field, and the same tokenizer as a
HuggingFace file that the `tokenizers` library loads and agrees with."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tokenizers import Tokenizer

from services.tokenizer import (
    KEY_BITS,
    PromptError,
    block_keys,
    chat_prompt,
    completion_prompt,
    encode,
    generated_text,
    tokenizer_json,
)


def test_block_keys_are_per_full_block_and_name_their_prefix() -> None:
    a = block_keys(b"x" * 64 + b"y" * 64 + b"z" * 10, 64)
    assert len(a) == 2 and all(0 <= k < 1 << KEY_BITS for k in a)
    assert block_keys(b"x" * 64 + b"y" * 64 + b"w" * 70, 64)[:2] == a
    # the same second block after another first block is another key
    assert block_keys(b"q" * 64 + b"y" * 64, 64)[1] != a[1]
    assert block_keys(b"x" * 63, 64) == ()


def test_a_chat_that_goes_on_extends_its_prompt() -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = chat_prompt(first)
    assert prompt == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    more = chat_prompt([*first, {"role": "assistant", "content": "hello"}])
    assert more.startswith(prompt.removesuffix("<|assistant|>\n"))
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert chat_prompt(parts) == "<|user|>\nab\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
    ],
)
def test_bad_messages_name_the_field(messages: Any, field: str) -> None:
    with pytest.raises(PromptError) as err:
        chat_prompt(messages)
    assert str(err.value).startswith(f"{field}:")


def test_completion_prompts_as_text_or_token_ids() -> None:
    assert completion_prompt("héllo") == "héllo".encode()
    assert completion_prompt(["abc"]) == b"abc"
    assert completion_prompt([104, 105]) == b"hi"
    for bad in (["a", "b"], [300], None, 5):
        with pytest.raises(PromptError, match="prompt:"):
            completion_prompt(bad)


def test_generated_text_is_one_ascii_byte_per_token_and_continues() -> None:
    assert len(generated_text(0, 100)) == 100
    assert generated_text(0, 7) + generated_text(7, 5) == generated_text(0, 12)


def test_the_huggingface_file_counts_the_same_tokens() -> None:
    tok = Tokenizer.from_str(json.dumps(tokenizer_json()))
    text = "Plan the next read, wörld!\n\tok"
    ids = tok.encode(text).ids
    assert ids == list(encode(text))
    assert tok.decode(ids) == text
    assert tok.get_vocab_size() == 256
