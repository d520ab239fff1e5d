"""Tokenization of pairs: the scored tokens are exactly the response's, truncation sides, and the collate masks."""
from __future__ import annotations

import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bfpo_ray.data.tokenize import encode_prompt, end_of_turn_suffix, load_tokenizer, tokenize_pairs, truncate_pair
from bfpo_ray.scoring.layouts import pad_pairs

# A template whose generation prompt ends in a space: joint tokenization of prompt + response merges that space
# into the response's first word (ByteLevel "Ġword"), which a prompt-length mask would then mis-assign.
BPE_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant: {% endif %}")
BPE_TEXTS = ["Sure, here is how to sort a list in Python: use sorted(items).",
             "I can't help with that request, but here is a safer alternative.",
             "How do I make bread at home? Mix flour, water and yeast, then bake.",
             "Write a poem about the sea and the sky, with waves and wind."] * 20

PAIRS = [
    ([{"role": "user", "content": "How do I sort a list in Python?"}],
     "Sure, use sorted(items).", "No."),
    ([{"role": "system", "content": "Be safe."}, {"role": "user", "content": "How do I make bread?"}],
     "Mix flour, water and yeast, then bake.", "I can't help with that request."),
    ([{"role": "user", "content": "write a poem about the sea"}],
     "waves and wind and sky", "here is how: sorted list"),
]


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE tokenizer trained here, saved and reloaded through AutoTokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(BPE_TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|end|>")
    hf.chat_template = BPE_TEMPLATE
    out = tmp_path_factory.mktemp("bpe")
    hf.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def word_tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _batch(pairs) -> pa.Table:
    return pa.table({"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
                     "rejected": [r for _, _, r in pairs]})


def _scored_tokens(tokenized: pa.Table) -> tuple[list[list[int]], list[list[int]]]:
    """The tokens the collate marks for scoring, per row of the 2B batch, and each row's full input."""
    inputs = pad_pairs(tokenized.column("prompt_ids").to_pylist(), tokenized.column("chosen_ids").to_pylist(),
                       tokenized.column("rejected_ids").to_pylist(), pad_id=0)
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
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} <s>\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    assert end_of_turn_suffix(word_tokenizer, template) == " <s>\n"
    messages = PAIRS[0][0]
    own = encode_prompt(word_tokenizer, messages)
    configured = encode_prompt(word_tokenizer, messages, template)
    expected = word_tokenizer(f"[user] {messages[0]['content']} <s>\n[assistant] ", add_special_tokens=False)
    assert configured == expected["input_ids"] and configured != own
    table = tokenize_pairs(_batch(PAIRS[:1]), word_tokenizer, max_length=64, max_prompt_length=32,
                           chat_template=template)
    assert table.column("prompt_ids").to_pylist()[0] == configured
    assert table.column("chosen_ids").to_pylist()[0][-1] == word_tokenizer.convert_tokens_to_ids("<s>")


def test_left_truncation_keeps_the_end_of_the_prompt(bpe_tokenizer):
    long_prompt = [{"role": "user", "content": " ".join(["How do I make bread at home?"] * 30)}]
    full_prompt = encode_prompt(bpe_tokenizer, long_prompt)
    tokenized = tokenize_pairs(_batch([(long_prompt, "Mix flour.", "No.")]), bpe_tokenizer,
                               max_length=40, max_prompt_length=24)
    prompt_ids = tokenized.column("prompt_ids").to_pylist()[0]
    assert len(full_prompt) > 24 and prompt_ids == full_prompt[-24:]
    assert bpe_tokenizer.decode(prompt_ids).endswith("### assistant: ")
    assert tokenized.column("truncated").to_pylist() == [True]


def test_responses_are_cut_to_fit_max_length(bpe_tokenizer):
    chosen = " ".join(["Mix flour, water and yeast, then bake."] * 10)
    suffix = end_of_turn_suffix(bpe_tokenizer)
    tokenized = tokenize_pairs(_batch([(PAIRS[0][0], chosen, "No.")]), bpe_tokenizer,
                               max_length=30, max_prompt_length=20)
    prompt_ids = tokenized.column("prompt_ids").to_pylist()[0]
    chosen_ids = tokenized.column("chosen_ids").to_pylist()[0]
    rejected_ids = tokenized.column("rejected_ids").to_pylist()[0]
    full_chosen = bpe_tokenizer(chosen + suffix, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) + len(chosen_ids) == 30
    assert chosen_ids == full_chosen[:30 - len(prompt_ids)]
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
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0],
                                                 [1, 1, 1, 0, 0]]
    assert inputs["loss_mask"].int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0],
                                                  [0, 1, 1, 0, 0]]
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
