"""Precompute: run a frozen model over a dataset once and store its layers' outputs.

:func:`precompute` is the write side of layer recycling.  One pass over the
dataset, in order::

    DataLoader workers: item -> (input, side columns) -> key -> collate (speculative)
    main thread:        look keys up (store + this run) -> batch the misses -> model,
                        hooks capture the layers, the forward stops after the last one
    writer thread:      trim padding, cast, append, commit every N rows / seconds

Rows are keyed by content — the model inputs as fed: each sample's part of
the collated batch, trimmed to its tokens (:mod:`actstore.precompute.inputs`)
— so a rerun computes only what is missing or changed (a killed run resumes
where its last commit ended; a changed tokenizer, truncation, transform or
file recomputes the rows it changes) and a sample repeated in the dataset is
computed once.  The dataset's order is recorded as the view ``"dataset"``.

How items are read (the store's ``attrs["precompute"]`` records all of this):

- **Input.** A bare item (str, tensor, list, image ...) is the model input.  A
  tuple's element ``input`` (default 0) or a dict's key ``input`` (default: the
  first of ``input, inputs, text, image, x``) is the input; it is collated
  (``collate_fn``) and keyed as it reaches the model (or, with ``key_fn``, keyed
  raw, before ``collate_fn``).
- **Side columns.** The other elements of a tuple or dict (labels, ids) belong
  to the dataset position, not to the input: they are stored per position, as
  columns of the ``"dataset"`` view (``store.view_columns("dataset")``; format
  version 3), so a repeated input keeps each position's own values, and a rerun
  with only labels changed computes nothing and rewrites them.  Tuple element
  ``j`` becomes column ``item_j``, a dict key its own (sanitised) name.  Scalars become shape ``()`` fields (bool,
  int → int64, float → float32), arrays and tensors keep their shape (float64 →
  float32), str and bytes become ragged uint8 fields (UTF-8).  Shapes and
  dtypes are inferred from the first item; ``side_fields`` overrides a field or
  drops a column (``None``).
- **Layer fields.** One per layer, named after the registered module name with
  characters outside ``[A-Za-z0-9_.-]`` replaced by ``_`` (the final output,
  ``layers=None``, is field ``output``).  An output of shape (batch, tokens,
  ...) with a token mask — ``attention_mask`` in a dict batch, or
  ``lengths_fn(batch)`` — is stored ragged, trimmed to each sample's tokens;
  anything else is a fixed-shape field.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from actstore.environment import environment
from actstore.format.documents import name_argument
from actstore.format.fields import Field
from actstore.models.capture import resolve_layers
from actstore.precompute.augment import AugmentedItems, AugmentSpec, check_augment
from actstore.precompute.config import (
    STORE_DTYPES,
    CaptureConfig,
    CommitConfig,
    ExecutionConfig,
    ItemsConfig,
    PrecomputeConfig,
    StorageConfig,
)
from actstore.precompute.distributed import precompute_ranks
from actstore.precompute.items import Selector
from actstore.precompute.loader import default_collate, field_name
from actstore.precompute.run import Run
from actstore.storage.objects import is_url
from actstore.store import ActivationStore

__all__ = ["field_name", "precompute"]

def precompute(
    model: nn.Module,
    dataset: Any,
    path: str | os.PathLike[str],
    *,
    layers: str | Iterable[str] | Mapping[str, str] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    key_fn: Callable[[Any], bytes] | None = None,
    store_dtype: str | torch.dtype | None = None,
    compression: str | None = None,
    quantize: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    input: int | str | None = None,  # noqa: A002 - the natural name
    side_fields: Mapping[str, Field | None] | None = None,
    lengths_fn: Callable[[Any], Any] | None = None,
    autocast: bool | str | torch.dtype = False,
    commit_every_rows: int | None = None,
    commit_every_seconds: float | None = 60.0,
    max_in_flight: int = 4,
    overwrite: bool = False,
    compact: bool = True,
    allow_overflow: bool = False,
    reclaim: bool = True,
    augment: Callable[[Any, torch.Generator], Any] | None = None,
    augmentations: int = 1,
) -> ActivationStore:
    """Compute the outputs of ``layers`` of a frozen ``model`` for every sample of ``dataset`` into a store.

    Parameters
    ----------
    model
        The frozen network.  It is put in eval mode for the run (its mode is
        restored afterwards), moved to ``device`` and run under
        ``torch.inference_mode()``; its weights are never changed.
    dataset
        A map-style dataset (``len`` and ``[i]``, e.g. a list) or an iterable of
        raw samples; see the module docstring for how an item is split into the
        model input and side columns.
    path
        The store's directory: created if absent, resumed if it holds a store of
        the same model and configuration.
    layers
        Module names of ``model.named_modules()`` (all captured in one forward,
        which stops right after the last of them), or ``None`` for the output.
        Each layer is stored in a field named as written here (an alias such
        as sentence-transformers' ``0.auto_model.encoder.layer.2`` for
        ``0.model.encoder.layer.2`` included); a mapping module name → field
        name names the fields yourself (``{"encoder.layer.2": "hidden"}``).
    batch_size
        Samples per forward.
    device
        Default: ``cuda`` when available, else the CPU.
    collate_fn
        Turns a list of raw inputs into what the model eats (a tokenizer call,
        for instance).  Default: ``torch.utils.data.default_collate``.  A dict
        result is passed as keyword arguments (see
        :func:`actstore.models.capture.model_arguments`).
    key_fn
        Key rows by ``key_fn(raw input)`` (32 bytes, e.g. :func:`actstore.key`)
        instead of by the model inputs as fed.  Weaker: a key of the raw item
        does not see what ``collate_fn`` makes of it, so a changed tokenizer,
        truncation, ``max_seq_length`` or image transform, or a file edited in
        place under the same path, is served its old rows without a word.  Use
        it only where the collate cannot be split per sample.  Default: input
        keys (:func:`actstore.key` of each sample's trimmed part of the
        collated batch).
    store_dtype
        ``"float16"``, ``"bfloat16"`` or ``"float32"`` for floating outputs on
        disk.  Default: the output's own dtype (bit-exact).  A cast that would
        turn a finite output into ±inf (float16 holds magnitudes up to 65504)
        raises :class:`~actstore.CastOverflowError` before its batch is
        written, naming the field, the largest magnitude and a dtype that holds
        it; see ``allow_overflow``.
    compression
        ``"zstd"`` compresses the activation fields on disk (smaller; reads
        decompress, so they copy and random access is slower: see
        :class:`~actstore.Field`).  Default: raw, read zero-copy.  When
        resuming, ``None`` keeps what the store has.
    quantize
        ``"int8"`` or ``"float8_e4m3"`` stores the floating activation fields
        as codes plus one float32 scale per row (per token of a ragged field):
        about half of float16's disk, read back dequantised into ``store_dtype``
        (or the output's dtype) with a small, bounded error (docs/FORMAT.md
        §4.1).  NaN or inf in an output raises ``ValueError`` before its batch
        is written.  Reads copy.  Default: stored unquantised.  When resuming,
        ``None`` keeps what the store has.
    num_workers
        DataLoader workers that read items, compute keys and collate.
    progress
        Show a progress bar and print a final summary; ``False`` prints nothing.
    input
        Which part of a tuple (int) or dict (str) item is the model input.
    side_fields
        Side column name (tuple position as a str, or dict key) → the
        :class:`~actstore.Field` to store it as (raw: no compression or
        quantisation), or ``None`` to not store it.
    lengths_fn
        ``lengths_fn(batch) -> lengths`` of each sample, for token-level outputs
        of batches without an ``attention_mask`` (right padding); every output
        with three or more dimensions is then stored ragged, and each sample's
        input key covers only its tokens.
    autocast
        ``True`` (float16 on CUDA, bfloat16 on the CPU) or a dtype.  Rows computed
        so are not the model's own outputs: the record says so, and a later run
        continues the store only with the same setting.
    commit_every_rows, commit_every_seconds
        Commit after this many new rows or seconds (whichever first); a killed
        run loses at most that much.  Always commits at the end.
    max_in_flight
        Computed batches waiting for the writer thread; bounds memory.
    overwrite
        Replace a store at ``path`` that cannot be resumed (another model, other
        layers, dtype or item structure).  A matching store is always resumed;
        only a directory that is an actstore store is ever deleted.
    compact
        After the last commit, merge the store's segments into one
        (:meth:`~actstore.ActivationStore.compact`): one more sequential copy of
        the rows (and free space for it), after which every read costs one
        segment's (a run of many commits otherwise leaves a few segments per size
        tier of :class:`~actstore.TieredMerge`, and a gather across ``k``
        segments pays per segment).  ``False`` for stores too large to copy once
        more.
    allow_overflow
        Store finite outputs beyond ``store_dtype``'s range clamped to its
        largest finite value (±65504 for float16) instead of raising
        :class:`~actstore.CastOverflowError`.  Those rows then differ from the
        model's outputs by more than the dtype's rounding, silently: use it only
        when the outliers do not matter.  NaN and ±inf in the outputs are stored as they are.
    reclaim
        With ``compact``: when this run resumes a store whose ``dataset`` view
        referenced rows that the new view does not (items or preprocessing
        changed), and no other view references them, drop them in the final
        merge (:meth:`~actstore.ActivationStore.compact` with ``drop=``), so a
        store does not grow across reruns.  Rows no view ever referenced (a
        ``RecycledEncoder``'s, another run's) are kept.  Rows are renumbered in
        that commit (views and the key index with them).  ``False`` keeps every row.
    augment, augmentations
        Store ``augmentations`` (``K`` >= 2) augmented rows per dataset item
        instead of one: augmentation ``v`` of an item is the frozen part's output
        on ``augment(x, g)``, where ``x`` is the item's model input (before
        ``collate_fn``) and ``g`` a CPU ``torch.Generator`` seeded from the
        item's content key and ``v`` (:func:`actstore.augment_generator`), so a
        rerun reproduces every augmentation, raising ``K`` computes only the new
        ones, and a changed ``augment`` recomputes the augmentations it changes.
        ``augment`` must return a sample of its input's type and shape class and
        draw every random number from ``g``: both are checked on the first item.
        The store holds ``K`` times the rows and the run costs ``K`` times the
        forward; the ``"dataset"`` view lists ``len(dataset) * K`` positions
        (``p * K + v``).  Serve them with ``CachedDataset(..., augmentation="random")``.
        Needs a map-style dataset and input keys (not ``key_fn``).  See
        docs/augmentations.md.

    Returns
    -------
    ActivationStore
        The store, opened for reading.

    Raises
    ------
    ValueError
        Unknown layer (with close matches); a fixed-shape output whose shape
        changes between batches (naming the layer and both shapes).
    CastOverflowError
        An output does not fit ``store_dtype`` (unless ``allow_overflow``);
        rows of earlier batches are committed, nothing of that batch.
    TypeError
        A sample that cannot be keyed (naming its dataset index); a collated
        batch that cannot be split per sample, or whose structure (dict keys)
        differs from an earlier batch's (naming the positions).
    ValueError, TypeError
        ``augmentations < 1``; ``augment`` with ``augmentations=1`` (or ``K > 1``
        without one); an ``augment`` that is not deterministic under its
        generator, returns another type or shape class than its input, or
        raises (naming the item and augmentation).
    OSError
        ``collate_fn`` could not read an item (a file that vanished), naming its
        dataset index.
    StaleStoreError
        The store was computed by another model (unless ``overwrite``).
    StoreExistsError
        ``path`` holds something else: other files, or a store of other layers
        or configuration (unless ``overwrite``).

    Errors raised by the model, the dataset or the writer thread propagate;
    everything committed before them stays valid, and a rerun resumes there.

    Launched by ``torchrun --nproc-per-node N [--nnodes M]``, each rank computes
    every N-th block of ``batch_size`` samples on its own device into a part
    store under ``path/parts/``, and rank 0 merges the parts into ``path`` at
    the end (same keys and values as one process; rows in another order).  See
    :mod:`actstore.precompute.distributed`.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> data = [(torch.randn(4), i % 2) for i in range(10)]
    >>> store = precompute(model, data, tempfile.mkdtemp() + "/s", layers="1", progress=False)
    >>> len(store), sorted(store.fields), store.view("dataset")[:3].tolist()
    (10, ['1', 'item_1'], [0, 1, 2])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    if input is not None and (isinstance(input, bool) or not isinstance(input, (int, str))):
        raise TypeError(f"input: expected an int (tuple items), a str (dict items) or None, got {input!r}")
    for name, f in (side_fields or {}).items():
        if f is not None and not isinstance(f, Field):
            raise TypeError(f"side_fields[{name!r}]: expected an actstore.Field or None, got {type(f).__name__}")
    dev = _device(device)
    resolved, names = _layers(model, layers)
    batch = _positive("batch_size", batch_size)
    stored = _store_dtype(store_dtype), _compression(compression), _quantize(quantize)
    autocast_dtype = _autocast_dtype(autocast, dev)
    every = (_positive("commit_every_rows", commit_every_rows, True),
             _positive("commit_every_seconds", commit_every_seconds, True, float))
    in_flight = _positive("max_in_flight", max_in_flight)
    aug = _augment(augment, augmentations, dataset, key_fn)
    cfg = PrecomputeConfig(
        capture=CaptureConfig({layer: names[layer] for layer in resolved}, lengths_fn=lengths_fn),
        items=ItemsConfig(Selector(input, _forward_args(model)), collate_fn=collate_fn or default_collate,
                          key_fn=key_fn, side_fields=dict(side_fields or {}), augment=aug),
        storage=StorageConfig(*stored, overwrite=bool(overwrite), allow_overflow=bool(allow_overflow)),
        execution=ExecutionConfig(dev, batch_size=batch, num_workers=num_workers, autocast=autocast_dtype,
                                  max_in_flight=in_flight, progress=bool(progress)),
        commits=CommitConfig(*every, compact=bool(compact), reclaim=bool(reclaim)))
    root = os.fspath(path)
    if is_url(root):
        raise ValueError(f"path: precompute writes a local (or shared-filesystem) store, got the URL {root!r}; "
                         "precompute to a path, then upload it with `actstore push PATH URL`")
    root = os.path.abspath(root)
    if aug is not None:
        check_augment(aug, dataset, cfg.items.selector, cfg.items.collate_fn, lengths_fn)
        dataset = AugmentedItems(dataset, aug.count)
    env = environment()
    if env.launched and env.world > 1:  # launched by torchrun: one disjoint part per rank, merged by rank 0
        return precompute_ranks(model, dataset, root, cfg)
    return Run(model, dataset, root, cfg).run()  # (adopts an interrupted distributed run's parts first)


# --- argument checking --------------------------------------------------------------


def _augment(fn: Any, count: Any, dataset: Any, key_fn: Any) -> AugmentSpec | None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"augmentations: expected an int >= 1 (the augmented rows stored per item; 1: none), got "
                         f"{count!r}")
    if fn is None:
        if count > 1:
            raise ValueError(f"augmentations={count}: pass augment=fn, the function fn(sample, generator) that makes "
                             "each augmentation")
        return None
    if not callable(fn):
        raise TypeError(f"augment: expected a callable fn(sample, generator) -> sample, got {type(fn).__name__}")
    if count == 1:
        raise ValueError("augment= with augmentations=1: a single stored augmentation would serve the same "
                         "augmented sample every epoch; pass augmentations=K (K >= 2) stored augmentations per item, "
                         "or drop augment= to store the items as they are")
    if key_fn is not None:
        raise ValueError("augment= needs rows keyed by the model inputs (augmented keys derive from them); drop key_fn=")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")) or \
            isinstance(dataset, torch.utils.data.IterableDataset):
        raise TypeError(f"augment=: expected a map-style dataset (len and [i]), got {type(dataset).__name__}: item p's "
                        "augmentations are read as dataset[p]")
    return AugmentSpec(fn, count)


def _layers(model: nn.Module, layers: Any) -> tuple[list[str], dict[str, str]]:
    """(registered module names, module → field name): each field named as the user wrote the layer."""
    if layers is None or isinstance(layers, str):
        wanted: list[tuple[Any, str | None]] = [(layers, None)]
    elif isinstance(layers, Mapping):
        wanted = list(layers.items())
        for _, f in wanted:
            if not isinstance(f, str):
                raise TypeError(f"layers: field names must be str, got {f!r}")
            name_argument(f, "layers: field name")
    else:
        wanted = [(x, None) for x in layers]
    resolved: list[str] = []
    names: dict[str, str] = {}
    asked: dict[str, Any] = {}
    for written, f in wanted:
        for canonical in resolve_layers(model, written):
            name = f or field_name(written if isinstance(written, str) else canonical)
            if canonical not in names:
                resolved.append(canonical)
                names[canonical], asked[canonical] = name, written
            elif names[canonical] != name:  # two names of one module (an alias): one forward output, two fields?
                raise ValueError(
                    f"layers: {asked[canonical]!r} and {written!r} are two names of one module (registered as "
                    f"{canonical!r}), asked for as two fields ({names[canonical]!r} and {name!r}); ask for it once")
    if not resolved:
        resolve_layers(model, [])  # raises: no layer
    return resolved, names


def _forward_args(model: nn.Module) -> frozenset[str]:
    """Names of the keyword arguments of ``model.forward`` (the keys a dict item may give it)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(n for n, p in params.items() if p.kind in kinds)


def _positive(name: str, value: Any, allow_none: bool = False, kind: type = int) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
    if not ok:
        raise ValueError(f"{name}: expected a positive {kind.__name__}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _quantize(value: Any) -> str | None:
    if value is not None:
        Field((), quantize=value)  # raises ValueError naming the choices
    return value  # type: ignore[no-any-return]


def _compression(value: Any) -> str | None:
    if value is not None:
        Field((), compression=value)  # raises ValueError naming the choices
    return value  # type: ignore[no-any-return]


def _store_dtype(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    name = value if isinstance(value, str) else str(value).replace("torch.", "")
    if name not in STORE_DTYPES:
        raise ValueError(f"store_dtype: expected one of {sorted(STORE_DTYPES)} or None, got {value!r}")
    return STORE_DTYPES[name]


def _device(value: Any) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {value!r} is not a torch device ({e})") from e


def _autocast_dtype(value: Any, device: torch.device) -> torch.dtype | None:
    if value is False or value is None:
        return None
    if value is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    name = value if isinstance(value, str) else str(value).replace("torch.", "")
    if name not in ("float16", "bfloat16"):
        raise ValueError(f"autocast: expected True, False, 'float16' or 'bfloat16', got {value!r}")
    return STORE_DTYPES[name]
