"""Preference-data sources: read raw rows, adapt each to the canonical pair record, validate it.

    for number, text in read_file_texts(path): ...           # the rows of one data file, as JSON texts
    pair = adapt_row(source_cfg, RawRow(location, key, number, parse_json_text(text)))   # or raises BadRow

The streaming ``prepare`` (``bfpo_ray.prepare.stages``) calls these from Ray Data tasks. A source
(``bfpo_ray.config.SourceConfig``) is a local JSONL / JSON / Parquet file, a directory of them (read recursively
in sorted path order), or a Hugging Face dataset name (``datasets.load_dataset(path, subset, split=split)``). Every
raw row carries its location (file path) and 1-based row number (the line number for JSONL), so a bad row is
reported as ``<source> <file> row <n>: field <f>: <reason>``.

Adapters (``SourceConfig.adapter``) map one raw row to the canonical record of ``bfpo_ray.data.schema``
(``id, source, role, prompt, chosen, rejected, chosen_safe, rejected_safe``) or raise ``BadRow(field, reason)``:

- ``pku_saferlhf`` (PKU-SafeRLHF v1): chosen = ``response_{better_response_id}`` (``response_{safer_response_id}``
  with ``SourceConfig.chosen="safer_response_id"``, the default under ``train.loss=sft``: the paper's SFT target),
  rejected = the other response; safety labels from the matching ``is_response_{i}_safe``. A row whose
  ``safer_response_id`` points at the response labelled unsafe while the other is labelled safe is accepted with
  those labels and counted under ``noted_by_reason`` as ``safer_response_id_disagrees``.
- ``ultrafeedback``: ``chosen``/``rejected`` as message lists whose last message is the assistant's response
  and whose earlier messages are the prompt (HuggingFaceH4 and trl-lib layouts), or as strings beside a
  ``prompt`` (flattened layouts). Both responses are safe. With ``drop_ties``, rows whose ``score_chosen`` equals
  ``score_rejected`` (top level or under ``metadata``) are dropped: counted as rejected with reason
  ``tied_scores`` and written to the rejects, in either ``on_bad_row`` mode.
- ``generic``: ``prompt`` (string or message list), ``chosen``, ``rejected``, ``chosen_safe``, ``rejected_safe``.
- ``hh_rlhf`` (Anthropic HH-RLHF): two ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcripts. The prompt is their
  shared prefix up to the ``"\\n\\nAssistant:"`` that opens its last assistant turn; the responses are what
  follows (one separating space removed). Safety labels come from ``SourceConfig.labels``.
- ``sft_chat`` (SFT only; UltraChat-200k): ``messages`` -> prompt = all but the last message, chosen = the last
  (assistant) message; ``rejected`` is the placeholder ``SFT_NO_REJECTED``, never trained on by the SFT loss.
- ``bfpo_redteaming`` (the BFPO authors' red-teaming pairs, ``data/zephyr-7b-beta_beaver_redteaming.json``):
  ``prompt``, chosen = ``modeloutput{better_modelout}`` (1 or 2), rejected = the other, labels from
  ``is_modelout{N}_safe``.

``rows_to_keep`` says how many of a source's accepted pairs ``fraction`` or ``rows`` keeps (which ones is the
pipeline's choice: the smallest hashes, or with ``select="head"`` the first ones in read order, as the paper's code
takes the head 20% of PKU-SafeRLHF's train split).

String prompts become ``[{"role": "user", "content": prompt}]``. Every record is validated: required fields
present, texts non-empty strings, labels booleans (or the ints 0/1), response ids 0 or 1, chosen != rejected,
message lists of ``{role, content}`` ending with a user turn. No Ray here: every function is pure and its inputs
and outputs pickle, so the pipeline can call them from Ray Data tasks or the driver.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from bfpo_ray.config import SourceConfig
from bfpo_ray.data import schema

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # .jsonl, .json and .csv may end in .gz or .zst too
COMPRESSION_SUFFIXES = (".gz", ".zst")
CHAT_ROLES = ("system", "user", "assistant")
ON_BAD_ROW = ("error", "skip")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
# "owner/name" or "name": what a Hugging Face dataset id looks like. Anything else that does not exist locally
# is reported as a missing path instead of being sent to the hub.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_LIKE_SUFFIXES = DATA_SUFFIXES + (".csv", ".tsv", ".txt", ".gz", ".zst", ".arrow")


# ---------------------------------------------------------------------------------------------------- errors


class SourceError(ValueError):
    """A source that cannot be read at all: missing path, unsupported file, unreadable file."""


class BadRow(Exception):
    """Raised by an adapter for one raw row: ``field`` names the offending field, ``reason`` is a short code
    (``missing``, ``not_string``, ``empty``, ...) used to count rejects, ``detail`` says more in words."""

    def __init__(self, field: str, reason: str, detail: str = ""):
        super().__init__(field, reason, detail)  # args hold every field, so the exception pickles (Ray tasks)
        self.field, self.reason, self.detail = field, reason, detail

    def __str__(self) -> str:
        return f"field {self.field!r}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class DroppedRow(BadRow):
    """A well-formed row that the source's config asks to drop (``drop_ties``): recorded as rejected in both
    ``on_bad_row`` modes, never an error."""


class BadRowError(SourceError):
    """A bad row in ``on_bad_row="error"`` mode; the message names source, file, row number, field and reason."""

    def __init__(self, source: str, location: str, row: int, field: str, reason: str, detail: str = ""):
        super().__init__(source, location, row, field, reason, detail)
        self.source, self.location, self.row = source, location, row
        self.field, self.reason, self.detail = field, reason, detail

    def __str__(self) -> str:
        return (
            f"source {self.source!r}: {self.location} row {self.row}: field {self.field!r}: {self.reason}"
            + (f" ({self.detail})" if self.detail else "")
            + "; fix the row, or set data.on_bad_row=skip to write bad rows to rejects/ and go on"
        )


# ---------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class InvalidJson:
    """The raw text of a JSONL line that does not parse; the adapter step rejects it as ``invalid_json``."""

    text: str
    error: str


@dataclass(frozen=True)
class RawRow:
    """One row as read, before adaptation.

    location: where it came from, for messages and rejects (a file path, or ``hf:<name>[<subset>]:<split>``).
    key: the location part of pair ids: the file's path relative to the source directory, the file name for a
         single-file source, or ``[<subset>/]<split>`` for a hub dataset.
    row: 1-based row number within the location (the line number for JSONL).
    data: the parsed row (a dict when well-formed; an ``InvalidJson`` for a JSONL line that does not parse).
    """

    location: str
    key: str
    row: int
    data: Any


def is_local(path: str) -> bool:
    """True when ``path`` names a local file or directory, or looks like one (so a missing one is an error).

    Looks like a local path: starts with ``/``, ``.`` or ``~``; has more than one ``/`` or a backslash; ends in a
    data-file suffix; or is not shaped like a hub id (``name`` or ``owner/name``). Everything else that does not
    exist locally is taken for a Hugging Face dataset name.
    """
    if Path(path).expanduser().exists():
        return True
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or path.lower().endswith(_FILE_LIKE_SUFFIXES)
        or not _HUB_NAME.match(path)
    )


def data_format(path: str | os.PathLike) -> str | None:
    """The format of a data file by its name: "jsonl", "json", "parquet" or "csv" (the text formats also when
    compressed: ``.jsonl.gz``, ``.jsonl.zst``, ``.csv.gz``, ...); None for any other name."""
    name = Path(path).name.lower()
    for compression in COMPRESSION_SUFFIXES:
        if name.endswith(compression):
            name = name[: -len(compression)]
            return next((f for f in ("jsonl", "json", "csv") if name.endswith("." + f)), None)
    return next((suffix[1:] for suffix in DATA_SUFFIXES if name.endswith(suffix)), None)


def source_files(source: SourceConfig) -> list[tuple[Path, str]]:
    """The data files of a local source as ``(path, id key)`` pairs, in sorted path order.

    A file source gives itself (key: its file name); a directory gives every JSONL/JSON/Parquet/CSV file under it
    (compressed text files included, see ``data_format``), recursively (key: the path relative to the
    directory), skipping hidden files and folders.
    """
    root = Path(source.path).expanduser()
    if not root.exists():
        raise SourceError(f"source {source.label!r}: {source.path} does not exist")
    if root.is_file():
        if data_format(root) is None:
            raise SourceError(
                f"source {source.label!r}: {source.path} is not a {'/'.join(DATA_SUFFIXES)} file "
                f"(text formats optionally {'/'.join(COMPRESSION_SUFFIXES)}-compressed)"
            )
        return [(root, root.name)]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and data_format(p) is not None
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise SourceError(f"source {source.label!r}: directory {source.path} holds no {'/'.join(DATA_SUFFIXES)} files")
    return [(p, p.relative_to(root).as_posix()) for p in files]


def _open_binary(path: Path):
    """A buffered binary stream of a local file, decompressed when its name ends in .gz or .zst (pyarrow's
    codecs, chosen from the extension)."""

    import pyarrow as pa

    return io.BufferedReader(pa.input_stream(str(path), compression="detect"), 1 << 20)


def read_file_texts(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(row number, JSON text)`` for every row of one data file, numbered from 1, without parsing JSONL lines.

    JSONL: the text of each non-blank line, its number the line number in the file (lines end at ``\n``; a
    ``\r\n`` end and a UTF-8 byte-order mark at the start of the file are removed). Other formats: each row of
    ``read_file`` serialised as JSON. The Ray Data reader of ``prepare`` ships these texts; adaptation parses them.
    """
    path = Path(path)
    if data_format(path) != "jsonl":
        for raw in read_file(path, path.name):
            yield raw.row, json.dumps(raw.data, ensure_ascii=False, default=str)
        return
    location = str(path)
    try:
        with _open_binary(path) as lines:
            for number, line in enumerate(lines, 1):
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                text = line.decode("utf-8").rstrip("\r\n")
                if text.strip():
                    yield number, text
    except UnicodeDecodeError as err:
        raise SourceError(f"{location} is not UTF-8 text: {err}") from None
    except OSError as err:  # a corrupt .gz/.zst stream
        raise SourceError(f"{location} could not be read: {err}") from None


def parse_json_text(text: str) -> Any:
    """A JSONL row's text parsed, or an ``InvalidJson`` holding the text when it does not parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return InvalidJson(text, str(err))


def read_file(path: str | os.PathLike, key: str) -> Iterator[RawRow]:
    """Rows of one JSONL, JSON, Parquet or CSV file (``data_format``), numbered from 1.

    JSONL (also .gz/.zst): one JSON value per line; blank lines are skipped (numbers stay line numbers); a line
    that does not parse becomes an ``InvalidJson`` row; a byte-order mark and CRLF line ends are accepted. JSON: a
    list of rows, or an object whose ``"data"`` holds the list. Parquet: read in record batches. CSV: one row per
    record after the header line (row n is line n + 1 when no field spans lines), values typed by pyarrow's
    inference (``true``/``false`` become booleans), read in blocks.
    """
    path = Path(path)
    location = str(path)
    kind = data_format(path)
    if kind == "jsonl":
        for number, text in read_file_texts(path):
            yield RawRow(location, key, number, parse_json_text(text))
    elif kind == "json":
        try:
            with _open_binary(path) as handle:
                tree = json.loads(handle.read().decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SourceError(f"{location} is not valid JSON: {err}") from None
        rows = tree.get("data") if isinstance(tree, dict) else tree
        if not isinstance(rows, list):
            raise SourceError(f'{location}: a .json source must hold a list of rows or {{"data": [rows]}}')
        for number, data in enumerate(rows, 1):
            yield RawRow(location, key, number, data)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a corrupt or non-Parquet file
            raise SourceError(f"{location} is not a readable Parquet file: {err}") from None
        number = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for data in batch.to_pylist():
                number += 1
                yield RawRow(location, key, number, data)
    elif kind == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        number = 0
        try:
            reader = pacsv.open_csv(
                pa.input_stream(str(path), compression="detect"),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
            )
            for batch in reader:
                for data in batch.to_pylist():
                    number += 1
                    yield RawRow(location, key, number, data)
        except (pa.ArrowInvalid, UnicodeDecodeError) as err:
            raise SourceError(f"{location} is not a readable CSV file (after row {number}): {err}") from None
    else:
        raise SourceError(f"{location}: unsupported file type; expected one of {DATA_SUFFIXES}")


def read_hub(source: SourceConfig) -> Iterator[RawRow]:
    """Rows of a Hugging Face dataset: ``datasets.load_dataset(source.path, source.subset, split=source.split,
    revision=source.revision)``."""
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision)
    except Exception as err:  # hub, network and builder errors have no common base class
        raise SourceError(
            f"source {source.label!r}: no local file or directory {source.path!r} exists, and "
            f"loading it as a Hugging Face dataset failed: {type(err).__name__}: {err}"
        ) from err
    location = f"hf:{source.path}" + (f"[{source.subset}]" if source.subset else "") + f":{source.split}"
    key = f"{source.subset}/{source.split}" if source.subset else source.split
    for number, data in enumerate(dataset, 1):
        yield RawRow(location, key, number, data)


# ---------------------------------------------------------------------------------------------------- field checks


def _value(row: dict, name: str) -> Any:
    if row.get(name) is None:
        raise BadRow(name, "missing")
    return row[name]


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow(name, "not_string", f"got {type(value).__name__}")
    if not value.strip():
        raise BadRow(name, "empty")
    return value


def _text(row: dict, name: str) -> str:
    return _check_text(_value(row, name), name)


def _flag(row: dict, name: str) -> bool:
    """A safety label: a bool, or the int 0 or 1."""
    value = _value(row, name)
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise BadRow(name, "not_boolean", f"got {value!r}")


def _response_id(row: dict, name: str) -> int:
    value = _value(row, name)
    if type(value) is not int or value not in (0, 1):
        raise BadRow(name, "not_0_or_1", f"got {value!r}")
    return value


def _messages(value: Any, name: str) -> list[dict]:
    """A non-empty list of ``{role, content}`` chat messages with known roles and non-empty contents,
    returned as plain two-key dicts (extra keys dropped)."""
    if not isinstance(value, list) or not value:
        raise BadRow(name, "bad_messages", "expected a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRow(name, "bad_messages", f"message {i} is not a {{role, content}} mapping with string content")
        if message.get("role") not in CHAT_ROLES:
            raise BadRow(
                name, "bad_messages", f"message {i} has role {message.get('role')!r}, not one of {CHAT_ROLES}"
            )
        if not message["content"].strip():
            raise BadRow(name, "empty", f"message {i} has empty content")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt(value: Any, name: str) -> list[dict]:
    """A prompt as chat messages ending with a user turn; a string is one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": _check_text(value, name)}]
    messages = _messages(value, name)
    if messages[-1]["role"] != "user":
        raise BadRow(name, "bad_messages", f"the prompt ends with a {messages[-1]['role']} turn, not a user turn")
    return messages


def _response_of(messages: list[dict], name: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise BadRow(name, "bad_messages", f"the last message is a {messages[-1]['role']} turn, not the assistant's")
    return messages[-1]["content"]


def _conversation(row: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) from ``chosen``/``rejected`` given as strings beside a
    ``prompt``, or as message lists whose last message is the response and whose earlier messages (the same in
    both) are the prompt. When the lists hold only the response, the prompt comes from ``prompt``; when they
    hold the conversation too, a given ``prompt`` must agree with it (a string: its last user turn)."""
    chosen, rejected = _value(row, schema.CHOSEN), _value(row, schema.REJECTED)
    if isinstance(chosen, str) or isinstance(rejected, str):
        return (
            _prompt(_value(row, schema.PROMPT), schema.PROMPT),
            _check_text(chosen, schema.CHOSEN),
            _check_text(rejected, schema.REJECTED),
        )
    chosen_messages, rejected_messages = _messages(chosen, schema.CHOSEN), _messages(rejected, schema.REJECTED)
    chosen_text = _response_of(chosen_messages, schema.CHOSEN)
    rejected_text = _response_of(rejected_messages, schema.REJECTED)
    context = chosen_messages[:-1]
    if rejected_messages[:-1] != context:
        raise BadRow(
            schema.REJECTED, "prompt_mismatch", "the messages before the response differ between chosen and rejected"
        )
    if not context:
        return _prompt(_value(row, schema.PROMPT), schema.PROMPT), chosen_text, rejected_text
    prompt = _prompt(context, schema.CHOSEN)
    given = row.get(schema.PROMPT)
    if given is not None and (
        given != prompt[-1]["content"] if isinstance(given, str) else _prompt(given, schema.PROMPT) != prompt
    ):
        raise BadRow(schema.PROMPT, "prompt_mismatch", "the prompt differs from the conversation in chosen")
    return prompt, chosen_text, rejected_text


def _score(row: dict, name: str) -> float:
    """A score, top level or under ``metadata``."""
    metadata = row.get("metadata")
    value = row.get(name)
    if value is None and isinstance(metadata, dict):
        value = metadata.get(name)
    if value is None:
        raise BadRow(name, "missing", "needed by drop_ties (top level or under metadata)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRow(name, "not_number", f"got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------------- adapters
# Each takes (raw row dict, source) and returns the pair fields: prompt, chosen, rejected, chosen_safe, rejected_safe,
# and, for an accepted row with something to report, NOTES: a tuple of reason codes counted per source.

NOTES = "notes"
SAFER_ID_DISAGREES = "safer_response_id_disagrees"  # pku_saferlhf: safer_response_id points at the unsafe response


def adapt_pku_saferlhf(row: dict, source: SourceConfig) -> dict:
    """PKU-SafeRLHF v1: y_w = response_{better_response_id} (or response_{safer_response_id} with
    ``source.chosen="safer_response_id"``), y_l = the other; s = is_response_{i}_safe.

    A ``safer_response_id`` pointing at the response labelled unsafe while the other is labelled safe does not
    reject the row: the labels stand, and the row is noted as ``SAFER_ID_DISAGREES`` (counted in the manifest).
    """
    responses = (_text(row, "response_0"), _text(row, "response_1"))
    safe = (_flag(row, "is_response_0_safe"), _flag(row, "is_response_1_safe"))
    better = _response_id(row, "better_response_id")
    safer = _response_id(row, "safer_response_id")
    first = safer if source.chosen == "safer_response_id" else better
    second = 1 - first
    pair = {
        schema.PROMPT: _prompt(_value(row, schema.PROMPT), schema.PROMPT),
        schema.CHOSEN: responses[first],
        schema.REJECTED: responses[second],
        schema.CHOSEN_SAFE: safe[first],
        schema.REJECTED_SAFE: safe[second],
    }
    if safe[0] != safe[1] and not safe[safer]:
        pair[NOTES] = (SAFER_ID_DISAGREES,)
    return pair


def adapt_ultrafeedback(row: dict, source: SourceConfig) -> dict:
    """UltraFeedback-binarized, native (message lists) or flattened (strings); both responses safe.
    With ``source.drop_ties``, a valid row with score_chosen == score_rejected raises ``DroppedRow``."""
    prompt, chosen, rejected = _conversation(row)
    if chosen == rejected:  # checked here too so that an invalid row is never counted as a tie
        raise BadRow(schema.REJECTED, "same_response", "chosen and rejected are identical")
    if source.drop_ties and _score(row, "score_chosen") == _score(row, "score_rejected"):
        raise DroppedRow("score_chosen", "tied_scores", "score_chosen == score_rejected and drop_ties is set")
    return {
        schema.PROMPT: prompt,
        schema.CHOSEN: chosen,
        schema.REJECTED: rejected,
        schema.CHOSEN_SAFE: True,
        schema.REJECTED_SAFE: True,
    }


def adapt_generic(row: dict, source: SourceConfig) -> dict:
    """Rows already in the canonical shape: prompt (string or messages), chosen, rejected, chosen_safe,
    rejected_safe (chosen/rejected may also be message lists, as for ultrafeedback). ``source.columns`` maps the
    rows' own field names to those; errors then name the row's own field."""
    if not source.columns:
        return _adapt_canonical(row)
    targets = set(source.columns.values())
    mapped = {key: value for key, value in row.items() if key not in targets}
    mapped.update({canonical: row[own] for own, canonical in source.columns.items() if own in row})
    try:
        return _adapt_canonical(mapped)
    except BadRow as bad:
        own = {canonical: own for own, canonical in source.columns.items()}.get(bad.field)
        if own is None:
            raise
        raise BadRow(own, bad.reason, bad.detail) from None


def _adapt_canonical(row: dict) -> dict:
    prompt, chosen, rejected = _conversation(row)
    return {
        schema.PROMPT: prompt,
        schema.CHOSEN: chosen,
        schema.REJECTED: rejected,
        schema.CHOSEN_SAFE: _flag(row, schema.CHOSEN_SAFE),
        schema.REJECTED_SAFE: _flag(row, schema.REJECTED_SAFE),
    }


def split_hh_transcript(text: str, name: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c"`` -> alternating user/assistant messages.

    Only a marker that changes the speaker starts a new message: a repeated ``"\\n\\nAssistant:"`` inside an
    assistant turn (some HH-RLHF responses contain one) stays part of that turn's text, so the messages always
    alternate and joining ``"\\n\\n{Human|Assistant}: " + content`` gives the transcript back. One space after
    each marker is removed from the content.
    """
    if not text.startswith(HH_HUMAN):
        raise BadRow(name, "bad_transcript", f"does not start with {HH_HUMAN!r}")
    messages: list[dict] = []
    position, speaker = 0, HH_HUMAN
    while position < len(text):
        other = HH_ASSISTANT if speaker == HH_HUMAN else HH_HUMAN
        start = position + len(speaker)
        end = text.find(other, start)
        end = len(text) if end < 0 else end
        content = text[start:end]
        content = content[1:] if content.startswith(" ") else content
        if not content.strip():
            raise BadRow(name, "empty", f"turn {len(messages)} ({speaker.strip()}) is empty")
        messages.append({"role": "user" if speaker == HH_HUMAN else "assistant", "content": content})
        position, speaker = end, other
    return messages


def adapt_hh_rlhf(row: dict, source: SourceConfig) -> dict:
    """HH-RLHF transcripts: the prompt is the shared prefix of chosen and rejected up to the ``"\\n\\nAssistant:"``
    that opens its last assistant turn, split into messages; the responses are the rest of each transcript and
    may not start another human turn; labels come from ``source.labels``."""
    chosen_text, rejected_text = _text(row, schema.CHOSEN), _text(row, schema.REJECTED)
    for name, text in ((schema.CHOSEN, chosen_text), (schema.REJECTED, rejected_text)):
        if not text.startswith(HH_HUMAN):
            raise BadRow(name, "bad_transcript", f"does not start with {HH_HUMAN!r}")
    shared = os.path.commonprefix([chosen_text, rejected_text])
    last_human = shared.rfind(HH_HUMAN)
    cut = shared.find(HH_ASSISTANT, last_human) if last_human >= 0 else -1
    if cut < 0:
        raise BadRow(
            schema.REJECTED,
            "prompt_mismatch",
            f"chosen and rejected share no prefix ending in a human turn and {HH_ASSISTANT!r}",
        )
    prompt = split_hh_transcript(chosen_text[:cut], schema.CHOSEN)
    start = cut + len(HH_ASSISTANT)
    responses = {}
    for name, text in ((schema.CHOSEN, chosen_text), (schema.REJECTED, rejected_text)):
        response = text[start:]
        response = response[1:] if response.startswith(" ") else response
        if HH_HUMAN in response:
            raise BadRow(
                name, "bad_transcript", f"the response goes on past the shared prompt into a {HH_HUMAN!r} turn"
            )
        responses[name] = _check_text(response, name)
    chosen_safe, rejected_safe = source.labels
    return {
        schema.PROMPT: prompt,
        schema.CHOSEN: responses[schema.CHOSEN],
        schema.REJECTED: responses[schema.REJECTED],
        schema.CHOSEN_SAFE: chosen_safe,
        schema.REJECTED_SAFE: rejected_safe,
    }


def _modelout_id(row: dict, name: str) -> int:
    """``better_modelout``: 1 or 2, as an int or a numeric string (the paper's code reads it with ``int()``)."""
    value = _value(row, name)
    if isinstance(value, str) and value.strip() in ("1", "2"):
        return int(value)
    if type(value) is not int or value not in (1, 2):
        raise BadRow(name, "not_1_or_2", f"got {value!r}")
    return value


def adapt_bfpo_redteaming(row: dict, source: SourceConfig) -> dict:
    """The BFPO authors' red-teaming pairs (``data/zephyr-7b-beta_beaver_redteaming.json`` in github.com/wx-zhang/
    bfpo): ``prompt``, two Zephyr-7B-beta outputs ``modeloutput1``/``modeloutput2``, ``better_modelout`` (1 or 2) and
    ``is_modelout1_safe``/``is_modelout2_safe``. y_w = modeloutput{better_modelout}, y_l = the other; labels from
    the matching ``is_modelout{N}_safe``, as the paper's code reads them."""
    outputs = {1: _text(row, "modeloutput1"), 2: _text(row, "modeloutput2")}
    safe = {1: _flag(row, "is_modelout1_safe"), 2: _flag(row, "is_modelout2_safe")}
    better = _modelout_id(row, "better_modelout")
    worse = 3 - better
    return {
        schema.PROMPT: _prompt(_value(row, schema.PROMPT), schema.PROMPT),
        schema.CHOSEN: outputs[better],
        schema.REJECTED: outputs[worse],
        schema.CHOSEN_SAFE: safe[better],
        schema.REJECTED_SAFE: safe[worse],
    }


SFT_NO_REJECTED = "[no rejected response: this record comes from a single-response SFT transcript]"


def adapt_sft_chat(row: dict, source: SourceConfig) -> dict:
    """Chat transcripts for SFT (HuggingFaceH4/ultrachat_200k layout): ``messages``, a list of ``{role, content}``
    ending with the assistant's reply. The prompt is every message before it (ending with a user turn); chosen is
    that last reply, the SFT target; earlier assistant turns are context, not targets. Other fields (``prompt``,
    ``prompt_id``) are ignored.

    A transcript has no second response: ``rejected`` is the fixed text ``SFT_NO_REJECTED`` (labelled safe, as is
    chosen) so the record fits the pair schema. SFT (``train.loss=sft``) trains on chosen and never on it; a
    preference loss on these records would compare a reply with that placeholder, so use them only for SFT.
    """
    messages = _messages(_value(row, "messages"), "messages")
    chosen = _response_of(messages, "messages")
    if len(messages) < 2:
        raise BadRow("messages", "bad_messages", "needs a user turn before the assistant's reply")
    return {
        schema.PROMPT: _prompt(messages[:-1], "messages"),
        schema.CHOSEN: chosen,
        schema.REJECTED: SFT_NO_REJECTED,
        schema.CHOSEN_SAFE: True,
        schema.REJECTED_SAFE: True,
    }


ADAPTERS: dict[str, Callable[[dict, SourceConfig], dict]] = {
    "pku_saferlhf": adapt_pku_saferlhf,
    "ultrafeedback": adapt_ultrafeedback,
    "generic": adapt_generic,
    "hh_rlhf": adapt_hh_rlhf,
    "sft_chat": adapt_sft_chat,
    "bfpo_redteaming": adapt_bfpo_redteaming,
}


def pair_id(label: str, raw: RawRow) -> str:
    """``<source label>:<location key>:<row>``: unique within a source and stable across runs."""
    return f"{label}:{raw.key}:{raw.row}"


def adapt_row(source: SourceConfig, raw: RawRow, label: str | None = None) -> dict:
    """One raw row -> the canonical pair record (``schema.PAIR_COLUMNS``, plus ``NOTES`` when the adapter noted
    something), or ``BadRow``/``DroppedRow``.

    ``label`` is ``source.label``, which callers adapting many rows compute once (it parses the path).
    """
    label = label or source.label
    if isinstance(raw.data, InvalidJson):
        raise BadRow("<row>", "invalid_json", raw.data.error)
    if not isinstance(raw.data, dict):
        raise BadRow("<row>", "not_object", f"got {type(raw.data).__name__}")
    pair = ADAPTERS[source.adapter](raw.data, source)
    if pair[schema.CHOSEN] == pair[schema.REJECTED]:
        raise BadRow(schema.REJECTED, "same_response", "chosen and rejected are identical")
    return {schema.ID: pair_id(label, raw), schema.SOURCE: label, schema.ROLE: source.role, **pair}


# ---------------------------------------------------------------------------------------------------- selection


def rows_to_keep(source: SourceConfig, available: int) -> int:
    """How many of a source's ``available`` accepted pairs to keep: ``rows`` (which must not exceed what is
    available), ``round(fraction * available)`` with halves rounded up and at least 1 when any are available,
    or all of them."""
    if source.rows is not None:
        if source.rows > available:
            raise ValueError(
                f"source {source.label!r}: rows={source.rows} asked for, but only {available} "
                "accepted pairs are available"
            )
        return source.rows
    if source.fraction is not None:
        return min(available, max(1 if available else 0, math.floor(source.fraction * available + 0.5)))
    return available
