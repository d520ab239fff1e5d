"""Paths that may be URIs: local paths and ``s3://``, ``gs://``, ``file://`` (any scheme pyarrow knows) resolved to
a pyarrow filesystem, as Ray Train and Ray Data do with ``storage_path`` and their readers and writers.

    fs, path = filesystem("s3://bucket/runs")     # (S3FileSystem, "bucket/runs")
    join("s3://bucket/runs", "a", "b")            # "s3://bucket/runs/a/b"
    absolute("runs")                              # "/current/dir/runs";  absolute("s3://b/x") == "s3://b/x"

S3-compatible servers other than AWS are reached through the URI's query (``s3://b/x?endpoint_override=
http://127.0.0.1:9000&scheme=http``) or the ``AWS_ENDPOINT_URL`` environment variable, as pyarrow reads them.
"""
from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


def filesystem(path: str | Path):
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), absolute(path)


def local_dir(path: str | Path) -> Path | None:
    """The local directory a path or ``file://`` URI names; None for remote URIs."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return Path(inner) if isinstance(fs, pafs.LocalFileSystem) else None


def exists(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


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


@contextmanager
def staged_dir(path: str | Path):
    """A local directory to write ``path``'s files into: the directory itself for a local path or ``file://``
    URI; otherwise a temporary directory whose files are uploaded to ``path`` (``pyarrow.fs.copy_files``) when the
    block ends without an error."""
    import pyarrow.fs as pafs

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
    import pyarrow.fs as pafs

    local = local_dir(path)
    if local is not None:
        yield local
        return
    fs, inner = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="bfpo-download-") as tmp:
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
