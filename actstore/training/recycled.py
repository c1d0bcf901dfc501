"""Serving recycled activations where the frozen part used to run, at the dataset level: CachedDataset.

:class:`CachedDataset` is a drop-in for the user's dataset; its module-level
twin, a drop-in for the frozen module, is :class:`~actstore.training.encoder.RecycledEncoder`.

Keys are content addresses of what reached the frozen part (the model inputs
as fed: each sample's trimmed part of the collated batch, see
:mod:`actstore.precompute.inputs`), so the same sample is found whatever batch
or position it arrives in, and a sample whose preprocessing changed is not.
At construction :class:`CachedDataset` recomputes the keys of the dataset's
items with the precompute's collate and compares them with the rows it will
serve (:mod:`actstore.training.checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from actstore.deprecation import renamed_arguments
from actstore.engine.read.gather import row_view
from actstore.errors import DatasetMismatchError, MissingRowsError, StoreError
from actstore.precompute.augment import AugmentSpec
from actstore.precompute.items import ItemLayout, decode_item, infer_input, item_part
from actstore.store import ActivationStore
from actstore.training.augmented import BLOCK, EpochSampler, augmentation_mode, block_choices, split_indices
from actstore.training.checks import KeyCheck, augmented_position_keys, cheap_to_key, key_check, position_keys
from actstore.training.collate import ActivationCollate, RowBatch
from actstore.training.datasets import (
    RecordSummary,
    _check_fields,
    _positions,
    _StoreHolder,
    check_frozen,
    precompute_config,
)
from actstore.training.encoder import output_rows
from actstore.training.sides import SideSource, default_sides

__all__ = ["CachedDataset"]


_UNSET: Any = object()


class CachedDataset(_StoreHolder, Dataset):  # type: ignore[type-arg]
    """The user's dataset with each item's input replaced by its cached activations.

    Same length and order as ``dataset``; ``ds[i]`` has the structure of
    ``dataset[i]`` (a dict, tuple, namedtuple or the bare input) with the input
    part replaced by the activations (one tensor, or ``{field: tensor}`` when the
    store holds several layers) and the side parts (labels, ids) those precompute
    stored for position ``i``: read from the per-position columns of the view
    it recorded (a repeated input keeps each position's label), so the
    original items are **not read** after construction; position → row comes
    from that view.  They are compared with ``dataset[i]``'s own at the
    positions ``check`` reads (every position for cheap items; a spot check of
    8 otherwise, which does not see a relabelled position it does not pick:
    pass ``check="all"``).  With ``index="keys"``, or a store that holds no side values
    (``RecycledEncoder``'s, ``infer(out=)``'s), side parts are read from
    ``dataset[i]`` itself: those modes read the item for every served position.
    Stores written before format version 3 hold side values per row (the first
    position's): they are served from there, and checked against the dataset.

    Parameters
    ----------
    dataset
        The dataset that was precomputed (anything with ``len`` and ``[i]``).
    store
        The store precompute filled (or its path).
    input, side
        Which part of an item was the input (``None``: the whole item; a key or
        an index) and item part → side field; default: what precompute recorded,
        else (a store written without a precompute record) the rule precompute
        uses: a tuple item's element 0, a dict item's first key among ``input``,
        ``inputs``, ``text``, ``image``, ``x``; every other part is a side part.
    fields
        Activation fields to serve (default: precompute's layers).
    check
        Which items to verify at construction by computing ``dataset[i]``'s key
        today and comparing it with the key of the row served for ``i``.  For a
        store keyed by the model inputs (the default since precompute record
        version 2) the key is that of the input as fed: the items are collated
        with ``collate_fn`` in batches, split per sample and trimmed, as
        precompute did, so a changed tokenizer, truncation, transform or file
        is caught.  ``"auto"`` (default) checks every item when inputs are cheap
        to key (str, bytes, numbers, token ids and arrays of at most 4,096
        elements, dicts of those) and 8 seeded-random positions otherwise;
        ``"all"`` every item; an int that many seeded-random positions (spot
        checks); ``"items"`` (as ``"auto"``) compares keys of the raw items
        only — weaker: it does not see preprocessing or a file edited in place;
        it is what a store written before input keys (record version 1) allows,
        and the safe default refuses such a store.  ``.checked`` says how many
        positions were checked, ``.check_mode`` whether all or a spot check,
        ``.key_scheme`` by which keys (``"inputs"`` or ``"items"``).
        The same positions' side values are compared with the stored ones
        (``.sides_checked``): a dataset relabelled since precompute raises
        :class:`DatasetMismatchError`; rerunning precompute rewrites the side
        values without recomputing any activation.
    collate_fn
        The ``collate_fn`` precompute used, to compute today's input keys.
        Needed when precompute was given one (the error names it), unless
        ``model`` is a frozen part that knows it (a sentence-transformers
        model's ``preprocess``); when precompute used actstore's default
        collate, that is used without asking.
    lengths_fn
        The ``lengths_fn`` precompute used (token counts of batches without an
        ``attention_mask``), when it was given one.
    key_fn
        For stores keyed by raw items (precompute's ``key_fn=``): the same key
        function, when it was not :func:`actstore.key`.
    index
        ``"view"`` (default): positions map to rows through the store's view;
        ``"keys"``: key every input once now (by the store's key scheme) and look
        the keys up (for stores filled by :class:`~actstore.RecycledEncoder`,
        which records no view).
    input_name
        For dict items: the key the activations get (e.g. ``"hidden_states"``,
        an argument of the head's ``forward``, which ``transformers.Trainer``
        keeps); default the input's own key.
    fallback
        A frozen module (or :class:`~actstore.RecycledEncoder`) that computes the
        activations of positions with no row: called on a list of inputs, it
        returns a tensor batch, a list of per-row tensors, a
        :class:`~actstore.RaggedBatch`, a ``(padded, mask)`` pair or a dict of
        those per field.  Without one, missing rows raise :class:`MissingRowsError`.
    augmentation
        For a store with stored augmentations (``precompute(..., augment=fn,
        augmentations=K)``): ``"random"`` serves one of each position's ``K``
        augmentations per epoch (:meth:`set_epoch`), chosen from
        ``(augment_seed, epoch, position)`` only — the same in every worker,
        rank and instance — as a permutation: over epochs ``cK .. cK + K-1``
        each position sees each of its augmentations once; ``"draw"`` draws
        with replacement instead; an int ``v`` always serves augmentation
        ``v``.  ``None`` (default): a store without augmentations, served as
        always.  With DataLoader workers, sample through
        :class:`~actstore.training.augmented.EpochSampler` (``ds.epoch_sampler()``)
        so the workers see the epoch.
    augment_seed
        The seed of the choice (``augmentation="random"`` or ``"draw"``).
    augment
        The ``augment`` precompute used, to check the served augmented rows
        (each checked position's ``K`` augmentations are made again and keyed,
        as precompute did).  Needed unless ``check=0``.
    model, fingerprint
        When given, the store must hold what this model's frozen part computes
        (a frozen part from :func:`actstore.split`, or the full model), or carry
        this fingerprint.  Otherwise :class:`~actstore.StaleStoreError` (training the
        head leaves a store valid; changing a frozen weight does not).

    Raises
    ------
    DatasetMismatchError
        The dataset's length differs from what precompute recorded, or a
        checked input's key differs from the served row's (preprocessing or
        the items changed since precompute), or its side values from the stored ones.
    StaleStoreError
        A store keyed by raw items before input keys existed (record version
        1), under the safe default; rerun precompute, or pass ``check="items"``.
    ValueError
        A store keyed by inputs through a custom collate, and no ``collate_fn``.
    MissingRowsError
        Positions without a row, and no ``fallback``; the message says how many
        and how to fill them.
    NoAugmentationsError
        ``augmentation`` asked of a store without augmentations (the message
        says how to add them), or ``None`` of a store that holds only
        augmentations.
    """

    @renamed_arguments(store_or_path="store")
    def __init__(self, dataset: Any, store: Any, *, input: Any = _UNSET, side: Mapping[Any, str] | None = None,
                 fields: Sequence[str] | str | None = None, check: int | str = "auto", seed: int = 0, index: str = "view",
                 fallback: Callable[[list[Any]], Any] | None = None, key_fn: Callable[[Any], bytes] | None = None,
                 input_name: str | None = None, model: Any = None, fingerprint: str | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 lengths_fn: Callable[[Any], Any] | None = None, augmentation: str | int | None = None,
                 augment_seed: int = 0, augment: Callable[[Any, torch.Generator], Any] | None = None) -> None:
        self._hold(store)
        store = self.store
        check_frozen(store, model, fingerprint, where=f"CachedDataset({store.path})")
        # Rows are resolved once, here: a compaction that drops rows numbers them otherwise (_check_numbering).
        self._renumbered = store.manifest.renumbered
        cfg = precompute_config(store)
        n = len(dataset)
        #: stored augmentations per position (1: none), the serving mode ("random", "draw", an index or None)
        self.augmentations = cfg.record.augmentations if cfg.record is not None else 1
        self.augmentation = augmentation_mode(augmentation, self.augmentations, store.path, index)
        self.augment_seed, self.epoch = int(augment_seed), 0
        self._table: np.ndarray | None = None  # (n, K) rows of each position's augmentations
        self._by_epoch: dict[int, np.ndarray] = {}  # epoch -> row of each position (_epoch_rows)
        if input is not _UNSET:
            self.input = input
        else:
            self.input = cfg.input if cfg.record is not None else infer_input(dataset, n)
        self.side = dict(cfg.side or {}) if side is None else dict(side)
        if side is None and cfg.record is None and n:  # no record: every part but the input is a side part
            self.side = default_sides(dataset[0], self.input)
        layer_default = [n for n in (cfg.layers or store.fields) if n not in set(self.side.values())]
        self.fields = _check_fields(store, layer_default if fields is None else fields)
        where = f"CachedDataset({store.path})"
        if index not in ("view", "keys"):
            raise ValueError(f"index: expected 'view' or 'keys', got {index!r}")
        self._keys: KeyCheck = key_check(store, cfg, items=check == "items", collate_fn=collate_fn,
                                         lengths_fn=lengths_fn, key_fn=key_fn, where=where, model=model)
        #: the keys the check compares: "inputs" (the model inputs as fed) or "items" (the raw items: weaker)
        self.key_scheme = self._keys.scheme
        self.fallback = fallback
        self.dataset = dataset
        if index == "view":
            rows = self._view_rows(store, cfg, n * self.augmentations, where)
            if self.augmentations > 1:
                self._table = np.ascontiguousarray(rows, np.int64).reshape(n, self.augmentations)
                if fallback is not None:
                    raise ValueError(f"{where}: fallback= computes un-augmented activations; a store of "
                                     "augmentations serves only stored ones (rerun precompute to fill it)")
                rows = self._table[:, self.augmentation if isinstance(self.augmentation, int) else 0].copy()
                rows[(self._table < 0).any(axis=1)] = -1  # a position missing any augmentation is missing
        else:
            rows = store.lookup(position_keys(dataset, range(n), self.input, self._keys, where)) if n \
                else np.empty(0, np.int64)
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        present = np.nonzero(self.rows >= 0)[0]
        first = dataset[int(present[0])] if len(present) else (dataset[0] if n else None)
        recorded = cfg.record.item if cfg.record is not None else None
        self._template = ItemLayout.of(first, self.input, self.side if n else {}, where, recorded)
        if input_name is not None:
            if self._template.kind != "mapping":
                raise ValueError(f"input_name={input_name!r}: renames the input key of dict items, but the items are "
                                 f"{self._template.kind}")
            self._template = replace(self._template, input_name=input_name)
        self._sides = SideSource(store, self._template, index=index, view=cfg.view, where=where,
                                 inferred=side is None and cfg.record is None, stride=self.augmentations)
        if check in ("auto", "items"):
            full = n > 0 and cheap_to_key(item_part(first, self.input))
            spot = 8
        elif check == "all":
            full, spot = True, 0
        elif isinstance(check, int) and not isinstance(check, bool) and check >= 0:
            full, spot = False, check
        else:
            raise ValueError(f"check: expected 'auto', 'all', 'items' or a number of spot checks >= 0, got {check!r}")
        if index == "keys":  # every item was keyed to find its row: nothing left to check
            positions, full = present[:0], True
        elif full:
            positions = present
        else:
            gen = np.random.default_rng(seed)
            positions = np.sort(gen.choice(present, size=min(spot, len(present)), replace=False)) if len(present) \
                else present
        if self._table is None:
            self._check_keys(dataset, positions, first, where)
        else:
            self._check_augmented(dataset, positions, augment, where)
        #: dataset positions whose side values were compared with the stored ones at construction
        self.sides_checked = self._sides.check(store, dataset, positions if index == "view" else present[:0],
                                               self.rows, where)
        #: dataset positions whose key was checked at construction, and how ("all", "spot" or "keys")
        self.checked = len(present) if index == "keys" else len(positions)
        self.check_mode = "keys" if index == "keys" else "all" if full else "spot"
        missing = int((self.rows < 0).sum())
        if missing and fallback is None:
            first_missing = np.nonzero(self.rows < 0)[0][:5].tolist()
            if cfg.record is None:  # written by RecycledEncoder, infer(out=) or store.append: no precompute here
                fill = (f"the store has no row under the key of these items' input part (input={self.input!r}: "
                        "pass input= if another part is the input); fill it with the module that wrote it "
                        "(RecycledEncoder(..., append=True) over these inputs) or pass fallback=frozen_module to "
                        "compute them on the fly")
            else:
                fill = (f"fill them with actstore.precompute(model, dataset, {store.path!r}, ...) (or the command "
                        f"`actstore precompute ... {store.path}`), which computes only the missing rows, or pass "
                        "fallback=frozen_module to compute them on the fly")
            raise MissingRowsError(
                f"{where}: {missing} of {n} dataset positions have no row in the store (first: {first_missing}); "
                + fill)
        self.missing = missing

    def _check_keys(self, dataset: Any, positions: np.ndarray, first: Any, where: str) -> None:
        """Key ``dataset[p]``'s input for each position (by the store's scheme) and compare with the keys of the
        rows served for them (one gather)."""
        if not len(positions):
            return
        store = self.store
        keys = position_keys(dataset, positions, self.input, self._keys, where, type(first))
        stored = store.key_at(self.rows[positions])
        bad = np.flatnonzero((keys != stored).any(axis=1))
        if len(bad):
            p = int(positions[bad[0]])
            more = f" ({len(bad) - 1} more of the {len(positions)} checked positions differ too)" if len(bad) > 1 else ""
            what = "model input (as collate_fn feeds it)" if self.key_scheme == "inputs" else "input"
            raise DatasetMismatchError(
                f"{where}: dataset[{p}]'s {what} has key {keys[bad[0]].tobytes().hex()[:16]}…, but the store's row "
                f"{self.rows[p]} for that position holds {stored[bad[0]].tobytes().hex()[:16]}…{more}: preprocessing "
                "or the items changed since precompute (edited, reordered, another tokenizer, truncation or "
                f"transform): rerun actstore.precompute(model, dataset, {store.path!r}, ...) with today's pipeline "
                "— it recomputes only the changed rows — or pass the collate_fn precompute used"
            )

    def _check_augmented(self, dataset: Any, positions: np.ndarray, augment: Any, where: str) -> None:
        """Make each checked position's K augmentations again (as precompute did), key them and compare with the keys
        of the rows served for them."""
        if not len(positions):
            return
        if augment is None:
            raise ValueError(f"{where}: the store holds {self.augmentations} augmentations per item, made by "
                             f"{precompute_config(self.store).record.augment}; pass the same function as augment= so "  # type: ignore[union-attr]
                             "that the served rows are checked against today's items, or check=0 to serve them "
                             "unchecked")
        assert self._table is not None and self._keys.collate_fn is not None
        spec = AugmentSpec(augment, self.augmentations)
        keys = augmented_position_keys(dataset, positions, self.input, self._keys, spec, where)
        stored = self.store.key_at(self._table[positions].reshape(-1)).reshape(keys.shape)
        bad = np.argwhere((keys != stored).any(axis=2))
        if len(bad):
            p, v = int(positions[bad[0][0]]), int(bad[0][1])
            raise DatasetMismatchError(
                f"{where}: augmentation {v} of dataset[{p}] has key {keys[bad[0][0], v].tobytes().hex()[:16]}…, but "
                f"the store's row {self._table[p, v]} holds {stored[bad[0][0], v].tobytes().hex()[:16]}… ({len(bad)} "
                f"of the {keys.shape[0] * keys.shape[1]} checked augmentations differ): augment, the collate or the "
                f"items changed since precompute; rerun actstore.precompute(model, dataset, {self.store.path!r}, "
                "augment=..., augmentations=...) with today's pipeline (it computes only the changed augmentations)")

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations plain indices are served (``augmentation="random"`` or ``"draw"``).

        DataLoader workers hold their own copy of the dataset: with workers, wrap
        the sampler in :meth:`epoch_sampler` and call its ``set_epoch`` instead."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def epoch_sampler(self, sampler: Any = None) -> EpochSampler:
        """An :class:`~actstore.training.augmented.EpochSampler` over ``sampler`` (default: positions in order) whose
        indices carry the epoch to DataLoader workers."""
        return EpochSampler(self, sampler)

    def _check_numbering(self) -> None:
        """Refuse to serve once the handle reads a commit whose rows are numbered otherwise than the rows resolved at
        construction (the handle refreshed past a compaction that dropped rows): each position would get another
        sample's row."""
        if self.store.manifest.renumbered != self._renumbered:
            raise StoreError(
                f"CachedDataset({self.store.path}): the store's rows were renumbered since this dataset was built (a "
                "later precompute or compact(drop=...) dropped rows, and the store handle was refreshed or wrote that "
                "commit), so the rows it resolved for each position now hold other samples; build the CachedDataset "
                "again")

    def _serve(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """(positions, rows) of a batch's indices: plain positions, or (epoch, position) pairs."""
        self._check_numbering()
        if self._table is None:
            pos = _positions(indices, len(self.rows))
            return pos, self.rows[pos]
        epochs, raw = split_indices(indices, self.epoch)
        pos = _positions(raw, len(self.rows))
        if isinstance(epochs, int):
            return pos, self._epoch_rows(epochs)[pos]
        rows = np.empty(len(pos), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            rows[sel] = self._epoch_rows(int(e))[pos[sel]]
        return pos, rows

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        """The row each position is served in ``epoch`` (computed once per epoch and process; the last two kept)."""
        got = self._by_epoch.get(epoch)
        if got is None:
            table, mode = self._table, self.augmentation
            assert table is not None
            if isinstance(mode, int):
                got = table[:, mode].copy()
            else:  # one choice per block of positions: copy each block's column slice
                got = np.empty(len(table), np.int64)
                chosen = block_choices(self.augment_seed, epoch, np.arange(-(-len(table) // BLOCK)),
                                       self.augmentations, str(mode)).tolist()
                for b, v in enumerate(chosen):
                    got[b * BLOCK: (b + 1) * BLOCK] = table[b * BLOCK: (b + 1) * BLOCK, v]
            self._by_epoch = {**{e: r for e, r in self._by_epoch.items() if e == epoch - 1}, epoch: got}
        return got

    def batch_item(self, batch: RowBatch, i: int) -> Any:
        """The item of a :class:`RowBatch`'s ``i``-th row (its augmentation as chosen for the batch).  Never copies."""
        p, row = int(batch.positions[i]), int(batch.rows[i])
        if row < 0 or self._table is None:
            return self[p]
        return self._item(p, row)

    @staticmethod
    def _view_rows(store: ActivationStore, cfg: RecordSummary, n: int, where: str) -> np.ndarray:
        if cfg.view not in store.views:
            raise DatasetMismatchError(
                f"{where}: the store has no {cfg.view!r} view (views: {store.views}): it was not filled by "
                "actstore.precompute from a dataset; pass index='keys' to match items by content instead"
            )
        rows = store.view(cfg.view)
        # The view is rewritten by every precompute run; attrs keep the first run's length.
        recorded = len(rows)
        if n != recorded:
            raise DatasetMismatchError(
                f"{where}: the dataset has {n} items but precompute recorded {recorded}: the dataset changed; "
                "rerun precompute on it (it computes only the new rows) or pass index='keys'"
            )
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"CachedDataset({self.store.path!r}, items={len(self)}, fields={self.fields}, missing={self.missing}, "
                f"checked={self.checked} ({self.check_mode}))")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if not self.missing and not self._sides.reads_items:
            state["dataset"] = None  # never read again: do not ship it to workers
        return state

    def sampler_layout(self) -> tuple[ActivationStore, np.ndarray | None]:
        """(store, row of each position) — for :class:`ChunkShuffleSampler`."""
        return self.store, self.rows

    def __getitem__(self, i: int) -> Any:
        """``dataset[i]`` with its input replaced by the activations.  Never copies (computed rows aside)."""
        if isinstance(i, tuple) and self._table is not None:  # (epoch, position) from an EpochSampler
            pos, rows = self._serve([i])
            return self._item(int(pos[0]), int(rows[0]))
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        pos, rows = self._serve([i])
        return self._item(int(pos[0]), int(rows[0]))

    def _item(self, p: int, row: int) -> Any:
        store, t = self.store, self._template
        if row < 0:
            acts, _ = self._compute([p])
            value = {n: acts[n][0] for n in self.fields}
        else:
            seg, local = store.snapshot.locate(row)
            value = {name: row_view(seg, local, name, store.fields[name]) for name in self.fields}
        side_vals = self._sides.item(p, row, store, self.dataset)
        return decode_item(t, value[self.fields[0]] if len(self.fields) == 1 else value, side_vals)

    def __getitems__(self, indices: Sequence[int]) -> RowBatch:
        """The rows of a batch (computing missing ones with the fallback).  Never copies stored rows."""
        pos, rows = self._serve(indices)
        computed: dict[str, dict[int, torch.Tensor]] = {}
        miss = np.nonzero(rows < 0)[0]
        if len(miss):
            acts, side = self._compute(pos[miss].tolist())
            for name, vals in acts.items():
                computed[name] = dict(zip(miss.tolist(), vals, strict=True))
            for k, vals in side.items():
                computed[f"side:{k}"] = dict(zip(miss.tolist(), vals, strict=True))  # raw item parts
        items = self._sides.raw(pos, rows, self.dataset)  # side values read from the items (index="keys")
        if items is not None:
            computed["items"] = items
        return RowBatch(self, pos, rows, computed)

    def _compute(self, positions: list[int]) -> tuple[dict[str, list[torch.Tensor]], dict[Any, list[Any]]]:
        if self.fallback is None or self.dataset is None:
            raise MissingRowsError(f"positions {positions[:5]} have no row in the store and no fallback was given")
        items = [self.dataset[p] for p in positions]
        inputs = [item_part(it, self.input) for it in items]
        if hasattr(self.fallback, "encode_rows"):
            acts = self.fallback.encode_rows(inputs, self.fields)
        else:
            with torch.no_grad():
                out = self.fallback(inputs)
            acts = output_rows(out, self.fields, len(inputs))
        side = {k: [item_part(it, k) for it in items] for k in self._template.side}
        return acts, side

    def _collate(self, batch: RowBatch, opts: ActivationCollate, shared: bool) -> Any:
        self._check_numbering()
        store, t = self.store, self._template
        snap = store.snapshot
        acts = {n: opts.gather(snap, n, store.fields[n], batch.rows, shared=shared, extra=batch.computed.get(n))
                for n in self.fields}
        side = self._sides.batch(store, batch.positions, batch.rows, batch.computed, opts, shared)
        return decode_item(t, acts[self.fields[0]] if len(self.fields) == 1 else acts, side)
