"""Paths that may be URIs: local paths and ``s3://``, ``gs://``, ``file://`` (any scheme pyarrow knows) resolved to
a pyarrow filesystem, as Ray Train and Ray Data do with ``storage_path`` and their readers and writers.

    fs, path = filesystem("s3://bucket/runs")     # (S3FileSystem, "bucket/runs")
    join("s3://bucket/runs", "a", "b")            # "s3://bucket/runs/a/b"
    absolute("runs")                              # "/current/dir/runs";  absolute("s3://b/x") == "s3://b/x"

S3-compatible servers other than AWS are reached through the URI's query (``s3://b/x?endpoint_override=
http://127.0.0.1:9000&scheme=http``) or the ``AWS_ENDPOINT_URL`` environment variable, as pyarrow reads them.
An S3 filesystem retries a failed request with AWS's standard strategy (exponential backoff with jitter, up to
``BFPO_S3_MAX_ATTEMPTS`` attempts, default 10: a request rides out an outage of about a minute and a half), and keeps
that strategy when it is pickled to Ray's workers.

    redact("s3://KEY:SECRET@b/x?secret_key=S")    # "s3://***@b/x?secret_key=***": what may be written or printed
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
S3_MAX_ATTEMPTS_ENV = "BFPO_S3_MAX_ATTEMPTS"  # forwarded to the train workers with every BFPO_* variable
S3_MAX_ATTEMPTS = 10
# Credentials read from the environment by pyarrow, the trackers and the hub: their values are redacted wherever seen
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RAY_AUTH_TOKEN",
)
REDACTED = "***"
# scheme://user[:password]@ (a password may hold "/"); "anonymous" (GCS without credentials) names no secret
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s@/?#:]+(?::[^\s@]*)?)@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&\s]*(?:key|secret|token|passw|pwd|credential|sig)[^=&\s]*=)"
    r"(?P<value>[^&\s#'\"]*)",
    re.IGNORECASE,
)
_MIN_SECRET_LENGTH = 6  # shorter environment values are not searched for (they would match ordinary text)


def is_uri(path: str | Path) -> bool:
    """True for ``<scheme>://...`` (``file://`` included); False for plain local paths."""
    return bool(_SCHEME.match(str(path)))


def absolute(path: str | Path) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged."""
    if is_uri(path):
        return str(path)
    return str(Path(path).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` with ``/``, keeping a URI's ``scheme://`` and query intact."""
    base = str(base)
    query = ""
    if is_uri(base) and "?" in base:
        base, query = base.split("?", 1)
        query = "?" + query
    for part in parts:
        base = base.rstrip("/") + "/" + str(part).strip("/")
    return base + query


def parent(path: str | Path) -> str:
    """The directory holding ``path``: a local path's parent (absolute), or the URI without its last part (query
    kept)."""
    path = str(path)
    if not is_uri(path):
        return str(Path(absolute(path)).parent)
    base, sep, query = path.partition("?")
    return base.rstrip("/").rsplit("/", 1)[0] + sep + query


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***``: the user (and password) of every ``scheme://user:pass@``,
    the values of query parameters named like a key, secret, token, password or signature, and the values of the
    SECRET_ENV variables set in this process. Used wherever a config, a path or an error is written or printed."""
    text = _USERINFO.sub(
        lambda m: m["scheme"] + (m["userinfo"] if m["userinfo"] == "anonymous" else REDACTED) + "@", str(text)
    )
    text = _SECRET_PARAM.sub(lambda m: m["name"] + REDACTED, text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LENGTH:
            text = text.replace(value, REDACTED)
    return text


def redact_tree(value):
    """``redact`` applied to every string of a nested structure of dicts, lists and tuples (a dumped config)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(item) for item in value)
    return value


class RedactedStream:
    """A text stream (``sys.stdout``, ``sys.stderr``) whose writes go through ``redact``; everything else is the
    wrapped stream's."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with AWS's standard retry strategy of ``max_attempts`` attempts (exponential backoff
    with jitter); unlike pyarrow's own, its pickled form keeps the strategy (Ray Train pickles the storage
    filesystem to its controller and workers, where the checkpoints are uploaded and downloaded)."""

    def __init__(self, max_attempts: int, options: dict):
        super().__init__(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts))
        self.max_attempts, self.options = max_attempts, options

    def __reduce__(self):
        return RetryingS3FileSystem, (self.max_attempts, self.options)


def filesystem(path: str | Path):
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI; an S3 one retries (RetryingS3FileSystem,
    ``BFPO_S3_MAX_ATTEMPTS`` attempts)."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    fs, inner = pafs.FileSystem.from_uri(str(path))
    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]  # what the URI set: credentials, endpoint, scheme, region, ...
        fs = RetryingS3FileSystem(int(os.environ.get(S3_MAX_ATTEMPTS_ENV, S3_MAX_ATTEMPTS)), options)
    return fs, inner


def local_dir(path: str | Path) -> Path | None:
    """The local directory a path or ``file://`` URI names; None for remote URIs."""
    fs, inner = filesystem(path)
    return Path(inner) if isinstance(fs, pafs.LocalFileSystem) else None


def exists(path: str | Path) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def delete(path: str | Path) -> None:
    """Remove a file if it exists."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_file(inner)


def read_text(path: str | Path) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as handle:
        return handle.read().decode("utf-8")


def write_text(path: str | Path, text: str) -> None:
    fs, inner = filesystem(path)
    parent = inner.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as handle:
        handle.write(text.encode("utf-8"))


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file or URI (blank lines skipped)."""
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def write_jsonl(path: str | Path, rows: list[dict]) -> str | Path:
    """Write ``rows`` as JSON lines (UTF-8, ``\\n``), leaving an unchanged file untouched so that its mtime keeps
    caches keyed on it valid; returns ``path``."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not exists(path) or read_text(path) != text:
        write_text(path, text)
    return path


@contextmanager
def staged_dir(path: str | Path):
    """A local directory to write ``path``'s files into: the directory itself for a local path or ``file://``
    URI; otherwise a temporary directory whose files are uploaded to ``path`` (``pyarrow.fs.copy_files``) when the
    block ends without an error."""
    local = local_dir(path)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    fs, inner = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="bfpo-upload-") as tmp:
        yield Path(tmp)
        fs.create_dir(inner, recursive=True)
        pafs.copy_files(tmp, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextmanager
def fetched_dir(path: str | Path):
    """A local directory holding ``path``'s files: the directory itself for a local path or ``file://`` URI;
    otherwise a temporary directory they are downloaded into (``pyarrow.fs.copy_files``), removed afterwards."""
    local = local_dir(path)
    if local is not None:
        yield local
        return
    fs, inner = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="bfpo-download-") as tmp:
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
