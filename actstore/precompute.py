"""Precompute: run a frozen model over a dataset once and store its layers' outputs.

:func:`precompute` is the write side of layer recycling.  One pass over the
dataset, in order::

    DataLoader workers: item -> (input, side columns) -> key -> collate (speculative)
    main thread:        look keys up (store + this run) -> batch the misses -> model,
                        hooks capture the layers, the forward stops after the last one
    writer thread:      trim padding, cast, append, commit every N rows / seconds

Rows are keyed by content, so a rerun computes only what is missing (a killed
run resumes where its last commit ended) and a sample repeated in the dataset
is computed once.  The dataset's order is recorded as the view ``"dataset"``.

How items are read (the store's ``attrs["precompute"]`` records all of this):

- **Input.** A bare item (str, tensor, list, image ...) is the model input.  A
  tuple's element ``input`` (default 0) or a dict's key ``input`` (default: the
  first of ``input, inputs, text, image, x``) is the input; the key is computed
  on that raw input, before ``collate_fn``.
- **Side columns.** The other elements of a tuple or dict are stored beside the
  activations, one field each: tuple element ``j`` becomes field ``item_j``, a
  dict key its own (sanitised) name.  Scalars become shape ``()`` fields (bool,
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

import argparse
import importlib
import importlib.util
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .capture import resolve_layers
from .cli import command
from .distributed import precompute_run
from .errors import StoreError
from .format import Field
from .pipeline import STORE_DTYPES
from .samples import Selector, field_name
from .store import ActivationStore

__all__ = ["field_name", "precompute"]

def precompute(
    model: nn.Module,
    dataset: Any,
    path: str | os.PathLike[str],
    *,
    layers: str | Iterable[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    key_fn: Callable[[Any], bytes] | None = None,
    store_dtype: str | torch.dtype | None = None,
    compression: str | None = None,
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
    batch_size
        Samples per forward.
    device
        Default: ``cuda`` when available, else the CPU.
    collate_fn
        Turns a list of raw inputs into what the model eats (a tokenizer call,
        for instance).  Default: ``torch.utils.data.default_collate``.  A dict
        result is passed as keyword arguments (see
        :func:`actstore.capture.model_arguments`).
    key_fn
        Content key of one raw input (32 bytes).  Default :func:`actstore.key`.
    store_dtype
        ``"float16"``, ``"bfloat16"`` or ``"float32"`` for floating outputs on
        disk.  Default: the output's own dtype (bit-exact).
    compression
        ``"zstd"`` compresses the activation fields on disk (smaller; reads
        decompress, so they copy and random access is slower: see
        :class:`~actstore.Field`).  Default: raw, read zero-copy.  When
        resuming, ``None`` keeps what the store has.
    num_workers
        DataLoader workers that read items, compute keys and collate.
    progress
        Show a progress bar and print a final summary; ``False`` prints nothing.
    input
        Which part of a tuple (int) or dict (str) item is the model input.
    side_fields
        Side column name (tuple position as a str, or dict key) → the
        :class:`~actstore.Field` to store it as, or ``None`` to not store it.
    lengths_fn
        ``lengths_fn(batch) -> lengths`` of each sample, for token-level outputs
        of batches without an ``attention_mask`` (right padding); every output
        with three or more dimensions is then stored ragged.
    autocast
        ``True`` (float16 on CUDA, bfloat16 on the CPU) or a dtype.
    commit_every_rows, commit_every_seconds
        Commit after this many new rows or seconds (whichever first); a killed
        run loses at most that much.  Always commits at the end.
    max_in_flight
        Computed batches waiting for the writer thread; bounds memory.
    overwrite
        Replace a store at ``path`` that cannot be resumed (another model, other
        layers, dtype or item structure).  A matching store is always resumed;
        only a directory that is an actstore store is ever deleted.

    Returns
    -------
    ActivationStore
        The store, opened for reading.

    Raises
    ------
    ValueError
        Unknown layer (with close matches); a fixed-shape output whose shape
        changes between batches (naming the layer and both shapes).
    TypeError
        A sample that cannot be keyed (naming its dataset index).
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
    :mod:`actstore.distributed`.

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
    run_kwargs = dict(
        layers=resolve_layers(model, layers),
        batch_size=_positive("batch_size", batch_size), device=dev, collate_fn=collate_fn, key_fn=key_fn,
        store_dtype=_store_dtype(store_dtype), compression=_compression(compression), num_workers=num_workers,
        progress=bool(progress),
        selector=Selector(input), side_fields=dict(side_fields or {}), lengths_fn=lengths_fn,
        autocast=_autocast_dtype(autocast, dev),
        commit_every_rows=_positive("commit_every_rows", commit_every_rows, True),
        commit_every_seconds=_positive("commit_every_seconds", commit_every_seconds, True, float),
        max_in_flight=_positive("max_in_flight", max_in_flight), overwrite=bool(overwrite))
    # In this process, or - launched by torchrun - one disjoint part per rank (see actstore.distributed).
    return precompute_run(model, dataset, os.fspath(path), run_kwargs)


# --- argument checking --------------------------------------------------------------


def _positive(name: str, value: Any, allow_none: bool = False, kind: type = int) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
    if not ok:
        raise ValueError(f"{name}: expected a positive {kind.__name__}{' or None' if allow_none else ''}, got {value!r}")
    return value


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


# --- the `actstore precompute` command --------------------------------------------------


class FactoryError(Exception):
    """A ``MODULE:FACTORY`` argument could not be loaded or called."""


def load_factory(spec: str, option: str) -> Callable[[], Any]:
    """Resolve ``MODULE:FACTORY`` (a module name or a ``.py`` path, and a callable in it)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"{option}: expected MODULE:FACTORY (for example mypkg.models:build), got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise FactoryError(f"{option}: no such file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"_actstore_factory_{uuid.uuid4().hex[:8]}", path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise FactoryError(f"{option}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise FactoryError(f"{option}: cannot import module {module_name!r} ({e}); check the name, "
                                   "the current directory and PYTHONPATH") from e
            raise FactoryError(f"{option}: importing {module_name!r} failed: {e}") from e
        except Exception as e:
            raise FactoryError(f"{option}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise FactoryError(f"{option}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise FactoryError(f"{option}: {spec} is a {type(factory).__name__}, not a callable factory")
    return factory  # type: ignore[return-value]


def call_factory(spec: str, option: str) -> Any:
    factory = load_factory(spec, option)
    try:
        return factory()
    except Exception as e:
        raise FactoryError(f"{option}: the factory {spec} failed: {type(e).__name__}: {e}") from e


def cmd_precompute(args: argparse.Namespace) -> int:
    try:
        made = call_factory(args.model, "--model")
        model, collate = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
        if not isinstance(model, nn.Module):
            raise FactoryError(f"--model: {args.model} returned {type(made).__name__}; expected a torch.nn.Module "
                               "or a (module, collate_fn) pair")
        dataset = call_factory(args.data, "--data")
    except FactoryError as e:
        print(f"actstore precompute: error: {e}", file=sys.stderr)
        return 2
    layers = None if not args.layer or args.layer == ["none"] else args.layer
    input_sel = int(args.input) if args.input is not None and args.input.lstrip("-").isdigit() else args.input
    try:
        store = precompute(
            model, dataset, args.out, layers=layers, batch_size=args.batch_size, device=args.device,
            collate_fn=collate, store_dtype=args.dtype, compression=args.compression, num_workers=args.workers, progress=not args.quiet,
            input=input_sel, autocast=args.autocast, commit_every_rows=args.commit_every_rows,
            commit_every_seconds=args.commit_every_seconds, overwrite=args.overwrite)
    except (ValueError, TypeError) as e:
        if isinstance(e, StoreError):
            raise  # main() reports store errors
        print(f"actstore precompute: error: {e}", file=sys.stderr)
        return 1
    store.close()
    return 0


@command("precompute", "run a frozen model over a dataset once and store its layers' outputs")
def _precompute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="callable returning the model, or (model, collate_fn); MODULE may be a .py path")
    p.add_argument("--data", required=True, metavar="MODULE:FACTORY", help="callable returning the dataset")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="module name to capture (repeat for several); omit, or 'none', for the model's output")
    p.add_argument("--out", required=True, metavar="PATH", help="the store (created, or resumed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(STORE_DTYPES), help="dtype on disk (default: the output's)")
    p.add_argument("--compression", choices=["zstd"], help="compress activations on disk (default: raw, zero-copy reads)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--input", help="tuple position or dict key of the model input in each item")
    p.add_argument("--autocast", action="store_true", help="run the model under autocast")
    p.add_argument("--commit-every-rows", type=int, metavar="N")
    p.add_argument("--commit-every-seconds", type=float, default=60.0, metavar="S")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store at PATH that cannot be resumed (other model, layers or configuration)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_precompute)
