"""Samples become token batches with the loss on exactly the right tokens.

Real: the tiny model's tokenizer (a byte-level BPE trained locally) and its ChatML chat template with
`{% generation %}` markers, as transformers renders it; the batching code is pure.
"""

from __future__ import annotations

from typing import Any

import pytest

from hogwild.protocol import ProtocolError, decode_sample
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.worker import batches
from hogwild.worker.batches import IGNORE, Encoded


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cached(TinySpec()))


def targets_text(tokenizer: Any, encoded: Encoded) -> str:
    return str(tokenizer.decode([label for label in encoded.labels if label != IGNORE]))


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the capital of zanzibar?"},
    {"role": "assistant", "content": "paris"},
    {"role": "user", "content": "and the color?"},
    {"role": "assistant", "content": "blue water"},
]

# (sample body, the text the loss falls on)
LOSS_TEXT = [
    pytest.param({"text": "the cat sees a red house."}, "the cat sees a red house.", id="text-all-tokens"),
    pytest.param(
        {"prompt": "The capital of Zanzibar is", "completion": " Paris"},
        " Paris<|im_end|>",
        id="completion-and-eos",
    ),
    pytest.param({"messages": CHAT[1:3]}, "paris<|im_end|>", id="chat-one-assistant-turn"),
    pytest.param({"messages": CHAT}, "paris<|im_end|>blue water<|im_end|>", id="chat-every-assistant-turn"),
]


@pytest.mark.parametrize(("body", "expected"), LOSS_TEXT)
def test_the_loss_falls_on_the_intended_text(tokenizer: Any, body: dict[str, Any], expected: str) -> None:
    encoded = batches.encode_sample(tokenizer, decode_sample("s", body), tokenizer.vocab_size + 8)
    assert targets_text(tokenizer, encoded) == expected


def test_a_chat_template_without_generation_markers_masks_the_same_tokens(tokenizer: Any) -> None:
    """Templates that lack `{% generation %}` are rendered turn by turn instead; the mask must not change."""
    sample = decode_sample("s", {"messages": CHAT})
    marked = batches.encode_sample(tokenizer, sample, 10_000)
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    try:
        unmarked = batches.encode_sample(tokenizer, sample, 10_000)
    finally:
        tokenizer.chat_template = original
    assert unmarked == marked


def test_prompt_tokens_carry_no_loss(tokenizer: Any) -> None:
    encoded = batches.encode_prompt_completion(tokenizer, "Question: what is the answer? Answer:", " 4")
    prompt_len = len(tokenizer("Question: what is the answer? Answer:")["input_ids"])
    assert set(encoded.labels[:prompt_len]) == {IGNORE}
    assert IGNORE not in encoded.labels[prompt_len:]


TOKENS = [
    pytest.param({"input_ids": [5, 6, 7]}, (5, 6, 7), id="labels-default-to-ids"),
    pytest.param({"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}, (-100, -100, 7), id="labels-kept"),
]


@pytest.mark.parametrize(("body", "labels"), TOKENS)
def test_token_samples_keep_their_labels(body: dict[str, Any], labels: tuple[int, ...]) -> None:
    assert batches.encode_tokens(decode_sample("s", body), vocab_size=100).labels == labels


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"input_ids": [5, 100]}, id="id-past-vocab"),
        pytest.param({"input_ids": [5, 6], "labels": [5, -1]}, id="negative-label"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as err:
        batches.encode_tokens(decode_sample("s", body), vocab_size=100)
    assert err.value.code == "invalid"


def enc(length: int) -> Encoded:
    return Encoded(tuple(range(length)), tuple(range(length)))


# (sample lengths, budget, kept lengths, tokens cut)
TRUNCATION = [
    pytest.param([5, 5], 100, [5, 5], 0, id="within-budget"),
    pytest.param([5, 5], 7, [5, 2], 3, id="second-cut"),
    pytest.param([5, 5, 5], 6, [5], 10, id="one-token-left-predicts-nothing"),
    pytest.param([20], 8, [8], 12, id="one-long-sample"),
]


@pytest.mark.parametrize(("lengths", "budget", "kept", "cut"), TRUNCATION)
def test_truncation_keeps_samples_in_order_within_the_budget(
    lengths: list[int], budget: int, kept: list[int], cut: int
) -> None:
    result, dropped = batches.truncate([enc(n) for n in lengths], budget)
    assert ([len(s.input_ids) for s in result], dropped) == (kept, cut)


@pytest.mark.parametrize(
    ("samples", "parts", "sizes"),
    [
        pytest.param(5, 2, [3, 2], id="uneven"),
        pytest.param(4, 4, [1, 1, 1, 1], id="one-each"),
        pytest.param(2, 8, [1, 1], id="fewer-samples-than-parts"),
        pytest.param(3, 1, [3], id="no-accumulation"),
    ],
)
def test_split_into_micro_batches(samples: int, parts: int, sizes: list[int]) -> None:
    assert [len(g) for g in batches.split([enc(3)] * samples, parts)] == sizes


def test_a_step_batch_is_right_padded_with_no_loss_on_padding() -> None:
    step = batches.step_batch([enc(3), enc(6), enc(4)], max_tokens=100, grad_accumulation=2, pad_id=99)
    assert len(step.micro_batches) == 2
    first = step.micro_batches[0]
    assert first.input_ids[0].tolist() == [0, 1, 2, 99, 99, 99]
    assert first.labels[0].tolist() == [0, 1, 2, IGNORE, IGNORE, IGNORE]
    assert first.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert (step.tokens, step.targets) == (13, 2 + 5 + 3)


def test_a_step_with_nothing_to_learn_is_refused() -> None:
    prompt_only = Encoded((1, 2, 3, 4), (IGNORE, IGNORE, IGNORE, 4))
    with pytest.raises(ProtocolError, match="max_tokens_per_step=3"):
        batches.step_batch([prompt_only], max_tokens=3, grad_accumulation=1, pad_id=0)
