"""Resume and compatibility: may this run write into the store (or adopt the part) it finds?

Every check that decides whether existing rows can be reused lives here, and
reads the typed precompute record (:func:`~actstore.format.record.read_record`),
never raw attrs:

- :func:`open_existing` — before the first batch: the directory at PATH is
  absent, an interrupted create, or a store of this model (fingerprint) and
  these layers (:class:`Resumed`); anything else raises, or with ``overwrite``
  is deleted.
- :func:`keep_or_replace` — after the first batch, once the items' structure is
  known: the record's item layout, key scheme and function, side fields, store
  dtype, compression and quantisation must match this run's (:func:`run_record`).
  A version-1 store (rows keyed by raw items) met by a run with input keys is
  the one scheme change that needs no ``overwrite``: its rows are looked up by
  input key (a row found is one computed from that very input, when the store
  used actstore's default collate) and the rest recomputed; a store that used
  another collate is replaced, its rows not being comparable.

Which rows a resumed run reuses needs no check here: rows are keyed by the
model inputs as fed (:mod:`actstore.precompute.inputs`), so a row whose
inputs changed (another tokenizer, truncation, transform, a file's bytes) is
not found and is computed again.
- :func:`part_problem`, :func:`same_config`, :func:`is_placeholder` — the same
  questions about a leftover or freshly computed part (``precompute/parts.py``).

New conditions for reusing rows (the identity of a row beyond its key) belong
in :func:`open_existing` / :func:`keep_or_replace` and :func:`part_problem`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from actstore.engine.write.writer import describe_fields
from actstore.errors import StaleStoreError, StoreError, StoreExistsError
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.format.keys import DEFAULT_KEY_NAMES
from actstore.format.layout import INDEXES_DIR, LOCK_DIR, SEGMENTS_DIR, VIEWS_DIR
from actstore.format.manifest import Manifest
from actstore.format.record import (
    AUGMENTED_RECORD_VERSION,
    RECORD_VERSION,
    ItemRecord,
    LayerRecord,
    PrecomputeRecord,
    read_record,
)
from actstore.models.fingerprint import fingerprint_matches
from actstore.precompute.config import VIEW, PrecomputeConfig
from actstore.precompute.items import SideColumns
from actstore.precompute.loader import DEFAULT_COLLATE_NAMES, qualname
from actstore.store import ActivationStore, delete_store, read_manifest
from actstore.store import open as open_store

__all__ = ["Resumed", "is_placeholder", "keep_or_replace", "open_existing", "part_problem", "run_record",
           "same_config"]


@dataclass
class Resumed:
    """A store this run continues: an append handle, the snapshot at start (for lookups), its layer fields."""

    store: ActivationStore
    reader: ActivationStore
    layer_fields: dict[str, Field] = field(default_factory=dict)

    @property
    def base(self) -> int:
        """Rows committed when the run started."""
        return len(self.reader)

    def close(self) -> None:
        self.store.close()
        self.reader.close()


def open_existing(root: str, cfg: PrecomputeConfig, fp: str, model: nn.Module) -> Resumed | None:
    """The store at ``root`` to resume, or None to create one (nothing there, or deleted under ``overwrite``).

    Raises :class:`StaleStoreError` (another model) or :class:`StoreExistsError`
    (other layers, a store precompute did not write, other files) unless
    ``overwrite``; a directory that is not an actstore store is never deleted.
    """
    if not os.path.exists(root):
        return None
    if not os.path.isdir(root):
        raise StoreExistsError(f"{root}: exists and is not a directory")
    if not os.path.exists(os.path.join(root, "zarr.json")):
        # A create() killed before its manifest leaves only the store's directories: resumable.
        if set(os.listdir(root)) - {SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR, LOCK_DIR}:
            raise StoreExistsError(f"{root}: exists, is not empty and is not an actstore store; "
                                   "pick another path (nothing there is deleted, even with overwrite=True)")
        return None
    manifest = read_manifest(root)
    problem: StoreError | None = None
    record: PrecomputeRecord | None = None
    try:
        record = read_record(manifest.attrs, root)
    except StoreError as e:  # another version's record, or a damaged one
        problem = e
    if record is not None and record.placeholder and manifest.rows == 0:
        delete_store(root)  # an empty store of an empty dataset: nothing to lose
        return None
    want = dict(cfg.capture.fields)
    have = {d.layer: d.field for d in record.layers} if record is not None else None
    # Other layers have another frozen part, hence another fingerprint: name the layers, the clearer cause.
    if (have is None or have == want) and not fingerprint_matches(manifest.fingerprint, fp, model, list(want)):
        problem = StaleStoreError(
            f"{root}: the store was computed by another model (fingerprint {str(manifest.fingerprint)[:16]}…, "
            f"this model's is {fp[:16]}…); pass overwrite=True (--overwrite) to delete and recompute it, "
            "or write to another path")
    elif problem is None and record is None:
        problem = StoreExistsError(f"{root}: holds a store that precompute did not write; pass overwrite=True "
                                   "to replace it, or write to another path")
    elif problem is None and have != want:
        problem = StoreExistsError(
            f"{root}: holds a store of other layers ({sorted(map(str, have or {}))}, fields "
            f"{describe_fields(manifest.fields)}) than requested ({sorted(want)}); pass overwrite=True "
            "(--overwrite) to replace it, or write to another path")
    if problem is not None:
        if not cfg.storage.overwrite:
            raise problem
        delete_store(root)
        return None
    store = open_store(root, mode="a")
    reader = open_store(root, mode="r")
    layers = set(cfg.capture.fields.values())
    return Resumed(store, reader, {n: f for n, f in store.fields.items() if n in layers})


def run_record(cfg: PrecomputeConfig, *, item: ItemRecord | None, ragged: set[str], length: int | None,
               dataset: Any, model: nn.Module, placeholder: bool = False) -> PrecomputeRecord:
    """The record this run writes (and compares a resumed store's with)."""
    store_dtype = cfg.storage.store_dtype
    aug = cfg.items.augment
    if aug is not None:  # the run's dataset is AugmentedItems: record the user's dataset and its length
        dataset = getattr(dataset, "dataset", dataset)
        length = None if length is None else length // aug.count
    return PrecomputeRecord(
        layers=tuple(LayerRecord(layer, f, f in ragged) for layer, f in cfg.capture.fields.items()),
        item=None if placeholder else item,
        view=VIEW,
        dataset_length=length,
        dataset_class=qualname(dataset),
        model_class=qualname(model),
        store_dtype=None if store_dtype is None else dtype_name(store_dtype),
        key_fn=qualname(cfg.items.key_fn) or "actstore.key",
        collate_fn=qualname(cfg.items.collate_fn),
        placeholder=placeholder,
        keys="items" if cfg.items.key_fn is not None else "inputs",
        lengths_fn=qualname(cfg.capture.lengths_fn),
        augment=None if aug is None else qualname(aug.fn),
        augmentations=1 if aug is None else aug.count,
        autocast=None if cfg.execution.autocast is None else dtype_name(cfg.execution.autocast),
        version=RECORD_VERSION if aug is None else AUGMENTED_RECORD_VERSION,
    )


def keep_or_replace(resumed: Resumed, root: str, cfg: PrecomputeConfig, mine: PrecomputeRecord,
                    side: SideColumns) -> bool:
    """Whether ``resumed`` holds this run's configuration: True to continue it.

    Otherwise raises :class:`StoreExistsError` naming what differs, or, with
    ``overwrite``, closes and deletes the store and returns False.
    """
    store, storage = resumed.store, cfg.storage
    have = read_record(store.attrs, root) or PrecomputeRecord(item=None)
    upgrade = (have.version == 1 and have.key_fn in DEFAULT_KEY_NAMES and mine.keys == "inputs")
    if upgrade and have.collate_fn not in DEFAULT_COLLATE_NAMES:
        _say_once(f"{root}: the store keys rows by raw items (precompute record version 1) and computed them "
                  f"through collate_fn {have.collate_fn}; rows are now keyed by the model inputs as fed, which its "
                  "rows cannot be matched to: replacing the store and computing every row again")
        resumed.close()
        delete_store(root)
        return False
    if upgrade:
        _say_once(f"{root}: the store keys rows by raw items (precompute record version 1); rows are now keyed by "
                  "the model inputs as fed: rows whose input key is found are kept, every other one is computed again")
    # A record without a sample layout (actstore.recycle's: rows keyed by inputs, no view, no side values)
    # takes any: the layout only concerns the side columns and the view this run writes.
    diffs = [k for k, a, b in (("sample", have.item, mine.item), ("keys", have.keys, mine.keys),
                               ("key_fn", have.key_fn, mine.key_fn))
             if a != b and not (upgrade and k != "sample") and not (k == "sample" and a is None)]
    side_specs = {c.field: c.spec for c in side.columns}
    row_sides = set(store.fields) - set(cfg.capture.fields.values())  # side values as row fields: before format 3
    if row_sides and (row_sides != set(side_specs) or any(store.fields[f] != side_specs[f] for f in row_sides)):
        diffs.append("side fields")
    layer_fields = resumed.layer_fields.values()
    if storage.store_dtype is not None:
        for f in layer_fields:
            if f.spec.torch.is_floating_point and f.dtype != dtype_name(storage.store_dtype):
                diffs.append("store_dtype")
                break
    elif have.store_dtype not in (None, "float32"):  # this run keeps the outputs' own dtype (bit-exact); the store
        # was cast to a narrower one (float32 holds float32, bfloat16 and float16 outputs exactly)
        diffs.append(f"store_dtype (the store holds rows cast to {have.store_dtype}; this run asks for the outputs' "
                     f"own dtype: pass store_dtype={have.store_dtype!r} to continue it)")
    if have.autocast != mine.autocast and not have.placeholder:  # rows under autocast are not the model's own
        then = f"were computed under autocast to {have.autocast}" if have.autocast else "record no autocast"
        now = f"autocast={mine.autocast!r}" if mine.autocast else "autocast=False"
        ask = f"autocast={have.autocast!r}" if have.autocast else "autocast=False"
        diffs.append(f"autocast (the store's rows {then}; this run asks {now}: pass {ask} to continue it)")
    if storage.compression is not None and any(f.compression != storage.compression for f in layer_fields):
        diffs.append("compression")
    if storage.quantize is not None and any(f.quantize != storage.quantize for f in layer_fields
                                            if f.spec.torch.is_floating_point):
        diffs.append("quantize")
    if not diffs:
        return True
    msg = (f"{root}: holds a store of this model and layers, but with another {', '.join(diffs)} "
           f"(stored: {None if have.item is None else have.item.to_json()}, store dtype {have.store_dtype}, rows "
           f"keyed by {have.keys} ({have.key_fn}); now: {None if mine.item is None else mine.item.to_json()}, "
           f"keyed by {mine.keys} ({mine.key_fn}))")
    if not storage.overwrite:
        raise StoreExistsError(msg + "; pass overwrite=True (--overwrite) to replace it, or use another path")
    resumed.close()
    delete_store(root)
    return False


# --- parts (leftover, or just computed by the ranks) ---------------------------------------------------


def _record_or_error(attrs: Any, where: str) -> PrecomputeRecord | StoreError | None:
    try:
        return read_record(attrs, where)
    except StoreError as e:
        return e


def part_problem(manifest: Manifest, fp: str, layers: list[str], where: str) -> str | None:
    """Why a store (a leftover part, or the store at PATH) cannot take part in this run, or None."""
    record = _record_or_error(manifest.attrs, where)
    if manifest.fingerprint != fp:
        return f"another model's activations (fingerprint {str(manifest.fingerprint)[:16]}…)"
    if record is None:
        return "a store precompute did not write"
    if isinstance(record, StoreError):
        return f"a precompute record this version cannot read ({record})"
    have = sorted(d.layer for d in record.layers)
    if not record.placeholder and have != sorted(layers):
        return f"other layers ({have})"
    return None


def is_placeholder(store: ActivationStore) -> bool:
    """An empty store whose record says its fields are placeholders (an empty dataset, or an empty rank)."""
    record = _record_or_error(store.attrs, store.path)
    return len(store) == 0 and isinstance(record, PrecomputeRecord) and record.placeholder


def same_config(main: ActivationStore, part: ActivationStore) -> bool:
    """Whether ``part``'s rows may be adopted into ``main``: the same fields, item layout, key function, dtype."""
    have, cfg = _record_or_error(main.attrs, main.path), _record_or_error(part.attrs, part.path)
    if dict(main.fields) != dict(part.fields):
        return False
    if not isinstance(have, PrecomputeRecord) or not isinstance(cfg, PrecomputeRecord):
        return have is None and cfg is None
    return (have.item, have.keys, have.key_fn, have.store_dtype, have.autocast) == \
        (cfg.item, cfg.keys, cfg.key_fn, cfg.store_dtype, cfg.autocast)


def _say_once(message: str) -> None:
    """One warning line per run (not per row)."""
    warnings.warn(message, RuntimeWarning, stacklevel=5)

