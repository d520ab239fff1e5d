"""Tokenization of pairs: the scored tokens are exactly the response's, truncation sides, and the collate masks."""

from __future__ import annotations

import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bfpo_ray.data.tokenize import (
    encode_prompt,
    end_of_turn_suffix,
    expected_bos_id,
    load_tokenizer,
    tokenize_pairs,
    truncate_pair,
)
from bfpo_ray.logprobs import pad_pairs

# A template whose generation prompt ends in a space: joint tokenization of prompt + response merges that space
# into the response's first word (ByteLevel "Ġword"), which a prompt-length mask would then mis-assign.
BPE_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant: {% endif %}"
)
BPE_TEXTS = [
    "Sure, here is how to sort a list in Python: use sorted(items).",
    "I can't help with that request, but here is a safer alternative.",
    "How do I make bread at home? Mix flour, water and yeast, then bake.",
    "Write a poem about the sea and the sky, with waves and wind.",
] * 20

PAIRS = [
    ([{"role": "user", "content": "How do I sort a list in Python?"}], "Sure, use sorted(items).", "No."),
    (
        [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "How do I make bread?"}],
        "Mix flour, water and yeast, then bake.",
        "I can't help with that request.",
    ),
    (
        [{"role": "user", "content": "write a poem about the sea"}],
        "waves and wind and sky",
        "here is how: sorted list",
    ),
]


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE tokenizer trained here, saved and reloaded through AutoTokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        BPE_TEXTS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<pad>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|end|>")
    hf.chat_template = BPE_TEMPLATE
    out = tmp_path_factory.mktemp("bpe")
    hf.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def word_tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _batch(pairs) -> pa.Table:
    return pa.table(
        {"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs], "rejected": [r for _, _, r in pairs]}
    )


def _scored_tokens(tokenized: pa.Table) -> tuple[list[list[int]], list[list[int]]]:
    """The tokens the collate marks for scoring, per row of the 2B batch, and each row's full input."""
    inputs = pad_pairs(
        tokenized.column("prompt_ids").to_pylist(),
        tokenized.column("chosen_ids").to_pylist(),
        tokenized.column("rejected_ids").to_pylist(),
        pad_id=0,
    )
    scored = [row[mask].tolist() for row, mask in zip(inputs["input_ids"], inputs["loss_mask"])]
    full = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    return scored, full


@pytest.mark.parametrize("which", ["word", "bpe"])
def test_scored_tokens_are_exactly_the_response(which, word_tokenizer, bpe_tokenizer):
    tokenizer = word_tokenizer if which == "word" else bpe_tokenizer
    suffix = end_of_turn_suffix(tokenizer)
    assert suffix == (" </s>\n" if which == "word" else "<|end|>\n")
    tokenized = tokenize_pairs(_batch(PAIRS), tokenizer, max_length=512, max_prompt_length=256)
    scored, full = _scored_tokens(tokenized)
    n = len(PAIRS)
    for i, (messages, chosen, rejected) in enumerate(PAIRS):
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for row, text in ((i, chosen), (n + i, rejected)):
            expected = tokenizer(text + suffix, add_special_tokens=False)["input_ids"]
            assert scored[row] == expected
            prompt_len = len(full[row]) - len(scored[row])
            assert full[row][:prompt_len] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            if which == "bpe":  # the scored tokens decode to the response text, nothing of the prompt
                assert tokenizer.decode(scored[row]) == text + suffix
    assert not any(tokenized.column("truncated").to_pylist())


def test_bpe_fixture_really_merges_across_the_boundary(bpe_tokenizer):
    """Guard for the test above: tokenizing prompt + response as one string puts different tokens after the
    prompt's length than tokenizing the response alone, so a length-based mask would drift."""
    suffix = end_of_turn_suffix(bpe_tokenizer)
    drifted = 0
    for messages, chosen, _ in PAIRS:
        prompt_text = bpe_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_len = len(bpe_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        joint = bpe_tokenizer(prompt_text + chosen + suffix, add_special_tokens=False)["input_ids"]
        drifted += joint[prompt_len:] != bpe_tokenizer(chosen + suffix, add_special_tokens=False)["input_ids"]
    assert drifted > 0


def test_configured_chat_template_overrides_the_tokenizers(word_tokenizer):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} <s>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert end_of_turn_suffix(word_tokenizer, template) == " <s>\n"
    messages = PAIRS[0][0]
    own = encode_prompt(word_tokenizer, messages)
    configured = encode_prompt(word_tokenizer, messages, template)
    expected = word_tokenizer(f"[user] {messages[0]['content']} <s>\n[assistant] ", add_special_tokens=False)
    assert configured == expected["input_ids"] and configured != own
    table = tokenize_pairs(
        _batch(PAIRS[:1]), word_tokenizer, max_length=64, max_prompt_length=32, chat_template=template
    )
    assert table.column("prompt_ids").to_pylist()[0] == configured
    assert table.column("chosen_ids").to_pylist()[0][-1] == word_tokenizer.convert_tokens_to_ids("<s>")


def test_left_truncation_keeps_the_end_of_the_prompt(bpe_tokenizer):
    long_prompt = [{"role": "user", "content": " ".join(["How do I make bread at home?"] * 30)}]
    full_prompt = encode_prompt(bpe_tokenizer, long_prompt)
    tokenized = tokenize_pairs(
        _batch([(long_prompt, "Mix flour.", "No.")]), bpe_tokenizer, max_length=40, max_prompt_length=24
    )
    prompt_ids = tokenized.column("prompt_ids").to_pylist()[0]
    assert len(full_prompt) > 24 and prompt_ids == full_prompt[-24:]
    assert bpe_tokenizer.decode(prompt_ids).endswith("### assistant: ")
    assert tokenized.column("truncated").to_pylist() == [True]


def test_responses_are_cut_to_fit_max_length(bpe_tokenizer):
    chosen = " ".join(["Mix flour, water and yeast, then bake."] * 10)
    suffix = end_of_turn_suffix(bpe_tokenizer)
    tokenized = tokenize_pairs(
        _batch([(PAIRS[0][0], chosen, "No.")]), bpe_tokenizer, max_length=30, max_prompt_length=20
    )
    prompt_ids = tokenized.column("prompt_ids").to_pylist()[0]
    chosen_ids = tokenized.column("chosen_ids").to_pylist()[0]
    rejected_ids = tokenized.column("rejected_ids").to_pylist()[0]
    full_chosen = bpe_tokenizer(chosen + suffix, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) + len(chosen_ids) == 30
    assert chosen_ids == full_chosen[: 30 - len(prompt_ids)]
    assert rejected_ids == bpe_tokenizer("No." + suffix, add_special_tokens=False)["input_ids"]
    assert tokenized.column("truncated").to_pylist() == [True]


def test_truncate_pair_by_hand():
    prompt, chosen, rejected, truncated = truncate_pair(list(range(10)), [20, 21, 22], [30], 8, 6)
    assert (prompt, chosen, rejected, truncated) == ([4, 5, 6, 7, 8, 9], [20, 21], [30], True)
    assert truncate_pair([1, 2], [3], [4], 8, 6) == ([1, 2], [3], [4], False)
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncate_pair([1], [2], [3], 4, 4)


def test_pad_pairs_masks_exactly_the_response_tokens():
    inputs = pad_pairs([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]], [[11], [12, 13]], pad_id=0)
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 10], [1, 2, 3, 11, 0], [4, 12, 13, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert inputs["loss_mask"].int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="as many prompts"):
        pad_pairs([[1]], [[2]], [], pad_id=0)


def test_missing_chat_template_is_an_error(tmp_path, word_tokenizer):
    word_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    bare = AutoTokenizer.from_pretrained(tmp_path)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------------- BOS

BOS_TEMPLATE_BODY = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
BOS_TEMPLATES = {
    "template_writes_bos": "{{ bos_token }}" + BOS_TEMPLATE_BODY,
    "template_without_bos": BOS_TEMPLATE_BODY,
}


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer that prepends ``<s>`` to tokenized text, as Llama's, Mistral's and Zephyr's
    tokenizer.json do (a TemplateProcessing post-processor), saved and reloaded through AutoTokenizer."""
    words = " ".join(" ".join(m["content"] for m in messages) + f" {c} {r}" for messages, c, r in PAIRS)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [words, "hi"],
        trainers.WordLevelTrainer(
            special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
        ),
    )
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    hf.chat_template = BOS_TEMPLATE_BODY
    out = tmp_path_factory.mktemp("bos-tokenizer")
    hf.save_pretrained(out)
    return out


def _starts_with_one_bos(ids: list[int], bos: int) -> bool:
    return ids[:1] == [bos] and ids[1:2] != [bos]


@pytest.mark.parametrize("template", sorted(BOS_TEMPLATES))
def test_every_prepared_sequence_starts_with_exactly_one_bos(template, bos_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    bos = tokenizer.bos_token_id
    assert expected_bos_id(tokenizer) == bos
    chat_template = BOS_TEMPLATES[template]
    rendered = tokenizer.apply_chat_template(
        PAIRS[0][0], chat_template=chat_template, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert (rendered[:1] == [bos]) == (template == "template_writes_bos")  # the two cases really differ
    long_prompt = [{"role": "user", "content": " ".join(["How do I make bread?"] * 20)}]
    pairs = PAIRS + [(long_prompt, "Mix flour.", "No.")]
    tokenized = tokenize_pairs(
        _batch(pairs), tokenizer, max_length=48, max_prompt_length=24, chat_template=chat_template
    )
    prompts = tokenized.column("prompt_ids").to_pylist()
    assert tokenized.column("truncated").to_pylist()[-1]  # the long prompt was cut from the left, BOS kept
    for (messages, _, _), prompt_ids in zip(pairs, prompts):
        assert _starts_with_one_bos(prompt_ids, bos)
        assert bos not in prompt_ids[1:]
        untruncated = encode_prompt(tokenizer, messages, chat_template)
        assert prompt_ids[1:] == untruncated[len(untruncated) - len(prompt_ids) + 1 :]
    for column in ("chosen_ids", "rejected_ids"):
        assert not any(bos in ids for ids in tokenized.column(column).to_pylist())
    _, full = _scored_tokens(tokenized)
    assert all(_starts_with_one_bos(row, bos) for row in full)


def test_a_bos_token_the_tokenizer_does_not_prepend_is_left_alone(word_tokenizer):
    """The toy world's tokenizer (and SmolLM2's, whose bos_token is ChatML's <|im_start|>) has a bos_token but
    does not prepend it: prompts are the template's ids, unchanged."""
    assert word_tokenizer.bos_token == "<s>" and expected_bos_id(word_tokenizer) is None
    template = "{{ bos_token }}" + BOS_TEMPLATE_BODY
    messages = PAIRS[1][0]
    rendered = word_tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert encode_prompt(word_tokenizer, messages, template) == list(rendered)
    assert encode_prompt(word_tokenizer, messages)[0] != word_tokenizer.bos_token_id


def test_truncate_pair_keeps_a_leading_bos():
    assert truncate_pair([7, 1, 2, 3, 4, 5], [20], [30], 8, 4, bos_id=7) == ([7, 3, 4, 5], [20], [30], True)
    assert truncate_pair([1, 2, 3, 4, 5], [20], [30], 8, 4, bos_id=7) == ([2, 3, 4, 5], [20], [30], True)
    assert truncate_pair([7, 1, 2], [20], [30], 8, 4, bos_id=7) == ([7, 1, 2], [20], [30], False)


def test_generation_prompts_start_with_exactly_one_bos(bos_tokenizer_dir, tmp_path):
    """generate_batch feeds the model encode_prompt's ids: the first forward of a real tiny Llama sees, on every
    left-padded row, one BOS as the first attended token."""
    import torch
    from transformers import AutoModelForCausalLM

    from bfpo_ray.evaluate.generation import generate_batch
    from bfpo_ray.toyworld.tiny_model import save_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "model", tokenizer)).eval()
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone())) if not seen else None
        ),
        with_kwargs=True,
    )
    prompts = ["How do I sort a list in Python?", "write a poem about the sea"]
    generate_batch(
        model,
        tokenizer,
        prompts,
        do_sample=False,
        max_new_tokens=2,
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        prefills=["", "waves"],
    )
    input_ids, attention_mask = seen[0]
    assert input_ids.shape[0] == 2
    for ids, mask in zip(input_ids, attention_mask):
        attended = ids[mask.bool()].tolist()
        assert _starts_with_one_bos(attended, tokenizer.bos_token_id) and attended.count(tokenizer.bos_token_id) == 1
    assert torch.equal(
        input_ids[0][attention_mask[0].bool()],
        torch.tensor(encode_prompt(tokenizer, [{"role": "user", "content": prompts[0]}])),
    )
