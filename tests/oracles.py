"""Test oracles: plain, in-memory versions of what the streaming ``prepare`` pipeline does, to check it against.

    load_source(source_cfg, on_bad_row)   every row of a source read, adapted and validated in one process
    mix(results, sources, seed)           each source's share kept, all kept pairs shuffled together
    assign_splits(pairs, eval_fraction)   the held-out split and the per-(split, role) index of given pairs

They use the library's pure pieces (``bfpo_ray.data.sources``: readers, adapters, checks) and nothing of Ray.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from bfpo_ray.config import SourceConfig
from bfpo_ray.data import schema
from bfpo_ray.data.sources import (
    NOTES,
    ON_BAD_ROW,
    BadRow,
    BadRowError,
    DroppedRow,
    InvalidJson,
    RawRow,
    adapt_row,
    is_local,
    read_file,
    read_hub,
    rows_to_keep,
    source_files,
)

SPLIT = "split"  # assign_splits' column: which split a pair belongs to


def read_rows(source: SourceConfig) -> Iterator[RawRow]:
    """Every raw row of a source: its local files in order, or the hub dataset."""
    if not is_local(source.path):
        yield from read_hub(source)
        return
    for path, key in source_files(source):
        yield from read_file(path, key)


@dataclass
class SourceResult:
    """What one source yielded. ``pairs``: canonical records in read order. ``rejects``: one dict per rejected
    row, ``{source, location, row, field, reason, detail, raw}`` (``raw`` JSON-serialisable). Every row read is
    in exactly one of the two lists, so read = accepted + rejected by construction."""

    source: str
    pairs: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)

    def counts(self) -> dict:
        """``{"read", "accepted", "rejected", "rejected_by_reason": {reason: n}}`` for the manifest, plus
        ``"noted_by_reason": {reason: n}`` when an adapter noted accepted rows (``NOTES``)."""
        counts = {
            "read": len(self.pairs) + len(self.rejects),
            "accepted": len(self.pairs),
            "rejected": len(self.rejects),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in self.rejects).items())),
        }
        if self.notes:
            counts["noted_by_reason"] = dict(sorted(self.notes.items()))
        return counts


def _jsonable(data: Any) -> Any:
    if isinstance(data, InvalidJson):
        return data.text
    return json.loads(json.dumps(data, default=str, ensure_ascii=False))


def adapt_rows(source: SourceConfig, rows: Iterable[RawRow], on_bad_row: str = "error") -> SourceResult:
    """Adapt and validate raw rows of one source (all of them, or one file's: results merge with ``merge``).

    on_bad_row="error": the first bad row raises ``BadRowError``. "skip": bad rows go to ``rejects``.
    Rows dropped by config (``DroppedRow``) go to ``rejects`` in both modes.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    label = source.label
    result = SourceResult(label)
    for raw in rows:
        try:
            pair = adapt_row(source, raw, label)
            result.notes.update(pair.pop(NOTES, ()))
            result.pairs.append(pair)
        except BadRow as bad:
            if on_bad_row == "error" and not isinstance(bad, DroppedRow):
                raise BadRowError(label, raw.location, raw.row, bad.field, bad.reason, bad.detail) from None
            result.rejects.append(
                {
                    "source": label,
                    "location": raw.location,
                    "row": raw.row,
                    "field": bad.field,
                    "reason": bad.reason,
                    "detail": bad.detail,
                    "raw": _jsonable(raw.data),
                }
            )
    return result


def load_source(source: SourceConfig, on_bad_row: str = "error") -> SourceResult:
    """Read, adapt and validate every row of a source."""
    return adapt_rows(source, read_rows(source), on_bad_row)


# ---------------------------------------------------------------------------------------------------- mixing


@dataclass
class MixResult:
    """``pairs``: the kept pairs of every source, in one seeded shuffle. ``kept``: source label -> pairs kept."""

    pairs: list[dict]
    kept: dict[str, int]


def rows_kept(source: SourceConfig, available: int, seed: int) -> list[int]:
    """Positions (in read order) of the ``rows_to_keep`` pairs a source keeps: the first ones with
    ``select="head"``, else a sample drawn from ``random.Random(f"{seed}:{source.label}")``, sorted."""
    count = rows_to_keep(source, available)
    if source.select == "head":
        return list(range(count))
    return sorted(random.Random(f"{seed}:{source.label}").sample(range(available), count))


def mix(results: list[SourceResult], sources: list[SourceConfig], seed: int) -> MixResult:
    """Keep each source's share of its pairs (``rows_kept``: a seeded sample or the head, in read order) and
    shuffle all kept pairs together.

    ``results[i]`` must come from ``sources[i]``; labels must be distinct (they prefix pair ids). The shuffle draws
    from ``random.Random(seed)``, so the mix depends only on the inputs and the seed.
    """
    if len(results) != len(sources):
        raise ValueError(f"mix got {len(results)} results for {len(sources)} sources")
    labels = [s.label for s in sources]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"sources share the label(s) {duplicates}; give each a distinct `name`")
    mixed: list[dict] = []
    kept: dict[str, int] = {}
    for result, source in zip(results, sources):
        if result.source != source.label:
            raise ValueError(f"result of source {result.source!r} given in the place of {source.label!r}")
        chosen = rows_kept(source, len(result.pairs), seed)
        mixed.extend(result.pairs[i] for i in chosen)
        kept[source.label] = len(chosen)
    random.Random(seed).shuffle(mixed)
    return MixResult(mixed, kept)


def assign_splits(pairs: Sequence[dict], eval_fraction: float) -> list[dict]:
    """Hold out ``eval_fraction * n`` pairs (halves rounded up) of each role (the first ones of the given, shuffled,
    order) and number the pairs of each (split, role) 0..N-1 in that order.

    Returns new records with ``split`` and ``index`` added, in the given order.
    """
    per_role = Counter(pair[schema.ROLE] for pair in pairs)
    held_out = {role: math.floor(eval_fraction * n + 0.5) for role, n in per_role.items()}
    seen: Counter = Counter()
    next_index: Counter = Counter()
    out = []
    for pair in pairs:
        role = pair[schema.ROLE]
        split = "eval" if seen[role] < held_out[role] else "train"
        seen[role] += 1
        out.append({**pair, SPLIT: split, schema.INDEX: next_index[split, role]})
        next_index[split, role] += 1
    return out
