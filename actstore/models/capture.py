"""Run a model and capture the outputs of named layers, stopping early.

Layer recycling needs the output of the last frozen layer. Running the whole
network to read one intermediate layer wastes the time of every layer above
it, so :class:`LayerCapture` registers forward hooks on the requested modules
and aborts the forward as soon as every one of them has produced its output:
capturing block 3 of a 12-block encoder costs about 3/12 of a full forward.

Layer names are the names of :meth:`torch.nn.Module.named_modules` (for
example ``"layer2"`` in a torchvision-style ResNet, ``"encoder.layer.2"`` in a
Hugging Face ``BertModel``, ``"0.model.encoder.layer.2"`` in a
sentence-transformers model). ``""`` is the model itself, that is, its final
output. A name that reaches a module through a property alias, such as
sentence-transformers' ``"0.auto_model.encoder.layer.2"``, is accepted and
resolved to the registered name.

Example
-------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> out = capture(model, torch.randn(3, 4), "1")
>>> out["1"].shape
torch.Size([3, 8])
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

__all__ = [
    "FINAL_OUTPUT",
    "LayerCapture",
    "StopForward",
    "canonical_name",
    "capture",
    "model_arguments",
    "reduce_output",
    "resolve_layers",
    "train_mode_matters",
]

FINAL_OUTPUT = ""
"""The layer name that stands for the model's own (final) output."""

# Keys looked up first when a layer returns a mapping or a dataclass: Hugging
# Face models put their main output in ``last_hidden_state``;
# sentence-transformers modules pass a features dict along and add
# ``token_embeddings`` (the transformer) or ``sentence_embedding`` (pooling).
_PREFERRED_KEYS = ("last_hidden_state", "sentence_embedding", "token_embeddings")


class StopForward(BaseException):
    """Raised from a forward hook to abort the model's forward once what is needed has run.

    It derives from :class:`BaseException`, not :class:`Exception`, so that
    model code guarding a call with ``except Exception`` cannot swallow it.
    The code that raises it catches it around the model call
    (:meth:`LayerCapture.run`, the frozen part of a split): it never reaches
    the caller.
    """


def _module_names(model: nn.Module) -> dict[int, str]:
    """Map ``id(module)`` to its registered name, first name wins."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    return names


def _follow_path(model: nn.Module, name: str) -> nn.Module | None:
    """Walk ``name`` attribute by attribute (properties included)."""
    obj: Any = model
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:  # a property may raise anything; treat as absent
            return None
    return obj if isinstance(obj, nn.Module) else None


def canonical_name(model: nn.Module, name: str) -> str | None:
    """Return the registered name of the module that ``name`` designates.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose submodules are searched.
    name : str
        A dotted module path. Registered names are returned unchanged; a path
        that goes through a property alias (``"0.auto_model.encoder"`` in a
        sentence-transformers model) is mapped to the registered name of the
        module it reaches (``"0.model.encoder"``).

    Returns
    -------
    str or None
        The name as listed by ``model.named_modules()``, or ``None`` when
        ``name`` designates no submodule of ``model``.
    """
    if name == FINAL_OUTPUT:
        return FINAL_OUTPUT
    modules = dict(model.named_modules())
    if name in modules:
        return name
    target = _follow_path(model, name)
    if target is None:
        return None
    return _module_names(model).get(id(target))


def resolve_layers(model: nn.Module, layers: str | Iterable[str] | None) -> list[str]:
    """Validate layer names against ``model.named_modules()``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to capture from.
    layers : str, iterable of str, or None
        One name, several names, or ``None`` for the model's final output
        (the name ``""``, :data:`FINAL_OUTPUT`).

    Returns
    -------
    list of str
        The registered names, in the order given, without duplicates.

    Raises
    ------
    ValueError
        A name designates no submodule (the message lists close matches and
        how to list every name), or no name was given.
    TypeError
        ``layers`` is not a string, an iterable of strings or ``None``.

    Examples
    --------
    >>> from torch import nn
    >>> resolve_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["1", "0", "1"])
    ['1', '0']
    """
    if layers is None:
        return [FINAL_OUTPUT]
    requested = [layers] if isinstance(layers, str) else list(layers)
    if not requested:
        raise ValueError("layers is empty; pass one or more module names, or layers=None for the model's final output")
    all_names: list[str] | None = None
    resolved: list[str] = []
    for name in requested:
        if not isinstance(name, str):
            raise TypeError(f"layers must be module names (str); got {type(name).__name__} {name!r}")
        canonical = canonical_name(model, name)
        if canonical is None:
            if all_names is None:
                all_names = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(map(repr, close))}." if close else ""
            raise ValueError(
                f"{type(model).__name__} has no module named {name!r}.{hint} "
                "List the valid names with [n for n, _ in model.named_modules()]."
            )
        if canonical not in resolved:
            resolved.append(canonical)
    return resolved


def train_mode_matters(module: nn.Module) -> bool:
    """Whether ``module`` is in train mode and holds a layer that computes differently there.

    Dropout and batch normalisation layers (``torch.nn``'s, which Hugging Face
    models use) make train-mode outputs differ from eval-mode ones; a module
    with neither gives the same numbers either way.
    """
    if not module.training:
        return False
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    return any(isinstance(m, kinds) and m.training for m in module.modules())


def _first_tensor(values: Iterable[Any]) -> torch.Tensor | None:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


def reduce_output(output: Any, layer: str = "?") -> torch.Tensor:
    """Reduce a module's output to the one tensor that is captured.

    Never copies: the tensor returned is (part of) ``output`` itself.

    Parameters
    ----------
    output : Any
        What the module returned.
    layer : str
        The layer's name, used in the error message.

    Returns
    -------
    torch.Tensor
        ``output`` if it is a tensor; the first tensor of a tuple or list; for
        a mapping (a dict, a Hugging Face ``ModelOutput``, a sentence-
        transformers features dict) or a dataclass, the first of the fields
        ``last_hidden_state``, ``sentence_embedding``, ``token_embeddings``
        that holds a tensor, else its first tensor field.

    Raises
    ------
    TypeError
        No tensor can be found in ``output``.

    Examples
    --------
    >>> import torch
    >>> t = torch.zeros(2)
    >>> reduce_output((t, None)) is t
    True
    """
    if isinstance(output, torch.Tensor):
        return output
    found: torch.Tensor | None = None
    if isinstance(output, (tuple, list)):
        found = _first_tensor(output)
    elif isinstance(output, Mapping):
        found = _first_tensor(output.get(k) for k in _PREFERRED_KEYS)
        if found is None:
            found = _first_tensor(output.values())
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        found = _first_tensor(getattr(output, k, None) for k in _PREFERRED_KEYS)
        if found is None:
            found = _first_tensor(getattr(output, f.name) for f in dataclasses.fields(output))
    if found is None:
        raise TypeError(
            f"layer {layer!r} returned {type(output).__name__}, which holds no tensor to "
            "capture; capture needs a tensor, a tuple/list containing one, or a dict, "
            "ModelOutput or dataclass with a tensor field. Capture one of its submodules "
            "that returns a tensor instead."
        )
    return found


def _wants_one_positional(model: nn.Module, keys: Iterable[str]) -> bool:
    """Whether ``model`` takes a mapping as one positional argument.

    True when ``forward`` has a required first parameter whose name is not a
    key of the mapping: ``nn.Sequential.forward(input)`` or
    ``SentenceTransformer.forward(input, **kwargs)``. ``BertModel.forward``
    (all parameters optional, ``input_ids`` among the keys) gets keywords.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        return False
    first = params[0]
    return first.default is inspect.Parameter.empty and first.name not in set(keys)


def model_arguments(model: nn.Module, inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn ``inputs`` into the ``(args, kwargs)`` that :func:`capture` calls ``model`` with.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    inputs : Any
        A tuple is unpacked as positional arguments. A mapping (a dict, a
        tokenizer's ``BatchEncoding``) is passed as keyword arguments, unless
        ``model.forward`` takes a required first argument whose name is not a
        key of the mapping (``nn.Sequential``, a ``SentenceTransformer`` fed
        ``model.tokenize(texts)``), in which case the mapping is that one
        argument. Anything else (a tensor) is the single positional argument.
        Wrap inputs in a 1-tuple to force the positional form.

    Returns
    -------
    tuple
        ``(args, kwargs)``; never copies the inputs.
    """
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, Mapping):
        if _wants_one_positional(model, inputs.keys()):
            return (inputs,), {}
        return (), dict(inputs)
    return (inputs,), {}


class LayerCapture:
    """Capture the outputs of named layers of ``model``, stopping early.

    Forward hooks on the requested modules record each one's output (reduced
    to a tensor by :func:`reduce_output`). As soon as every requested module
    has run, the hook of the last one to finish aborts the forward, so the
    layers above are never computed. Which requested module finishes last is
    learned at run time, so any order of names works. A module that runs
    several times in one forward (a shared module) is recorded at its first
    call. Requesting ``""`` (the model's final output) disables the early stop.

    Use it as a context manager to keep the hooks installed over many calls,
    or call :meth:`run` directly, which installs and removes them itself. The
    hooks only act inside :meth:`run`: calling the model directly while they
    are installed runs it normally.
    Hooks are removed on exit, also when the forward raises. Works under
    ``torch.no_grad()`` and ``torch.inference_mode()``; the caller picks the
    grad mode.

    Parameters
    ----------
    model : torch.nn.Module
        The model to run.
    layers : str, iterable of str, or None
        Module names (see :func:`resolve_layers`); ``None`` captures the
        model's final output (key ``""``) with a plain full forward.
    stop_early : bool
        Abort the forward once every requested layer has run (default).
    clone : bool
        Copy each captured output that later code in the same forward could
        still modify in place (for example ``bn1`` followed by
        ``ReLU(inplace=True)`` in a ResNet). The output whose hook stops the
        forward is never copied, so capturing one layer never copies. With
        ``clone=False`` nothing is copied and the caller vouches that no
        in-place operation touches a captured output.

    Attributes
    ----------
    layers : list of str
        The registered names being captured; they key :meth:`run`'s result.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with LayerCapture(model, ["0", "1"]) as cap, torch.inference_mode():
    ...     out = cap.run(torch.randn(3, 4))
    >>> sorted(out)
    ['0', '1']
    """

    def __init__(self, model: nn.Module, layers: str | Iterable[str] | None = None, *, stop_early: bool = True,
                 clone: bool = True) -> None:
        self.model = model
        self.layers = resolve_layers(model, layers)
        self._hooked = [name for name in self.layers if name != FINAL_OUTPUT]
        self._stop_early = stop_early and FINAL_OUTPUT not in self.layers
        self._clone = clone
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outputs: dict[str, torch.Tensor] = {}
        self._running = False

    # -- hooks ---------------------------------------------------------------

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._running or name in self._outputs:
                return
            tensor = reduce_output(output, name)
            last = len(self._outputs) + 1 == len(self._hooked)
            stopping = last and self._stop_early
            if self._clone and not stopping:
                tensor = tensor.clone()
            self._outputs[name] = tensor
            if stopping:
                raise StopForward

        return hook

    def _attach(self) -> None:
        if self._handles:
            raise RuntimeError("LayerCapture hooks are already installed; it is not re-entrant")
        modules = dict(self.model.named_modules())
        try:
            for name in self._hooked:
                self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LayerCapture:
        self._attach()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._detach()

    # -- running ---------------------------------------------------------------

    def run(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run ``model(*args, **kwargs)`` and return the captured outputs.

        Returns
        -------
        dict of str to torch.Tensor
            One tensor per requested layer, keyed by registered name, in the
            order of :attr:`layers`. Copies only as described for ``clone``.

        Raises
        ------
        RuntimeError
            A requested module exists but did not run during the forward
            (for example a pooler the model skips).
        """
        attached_here = not self._handles
        if attached_here:
            self._attach()
        self._outputs = {}
        final: Any = None
        self._running = True
        try:
            try:
                final = self.model(*args, **kwargs)
            except StopForward:
                pass
        finally:
            self._running = False
            if attached_here:
                self._detach()
        outputs, self._outputs = self._outputs, {}
        if FINAL_OUTPUT in self.layers:
            outputs[FINAL_OUTPUT] = reduce_output(final, FINAL_OUTPUT)
        missing = [name for name in self.layers if name not in outputs]
        if missing:
            raise RuntimeError(
                f"requested modules {missing} exist in {type(self.model).__name__} but did not "
                "run during this forward (the forward path skips them); capture a module "
                "that runs for these inputs"
            )
        return {name: outputs[name] for name in self.layers}

    def run_inputs(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Like :meth:`run`, with ``inputs`` unpacked by :func:`model_arguments`."""
        args, kwargs = model_arguments(self.model, inputs)
        return self.run(*args, **kwargs)


def capture(
    model: nn.Module,
    inputs: Any,
    layers: str | Iterable[str] | None = None,
    *,
    stop_early: bool = True,
    clone: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``inputs`` once and return the named layers' outputs.

    Parameters
    ----------
    model : torch.nn.Module
        The model to run. Put it in ``eval()`` mode yourself if you want
        dropout off; the grad mode is also the caller's.
    inputs : Any
        A tensor (one positional argument), a tuple (positional arguments) or
        a mapping such as a tokenizer's ``BatchEncoding`` (keyword arguments;
        see :func:`model_arguments` for the single-dict case of
        sentence-transformers).
    layers : str, iterable of str, or None
        Module names; ``None`` for the model's final output (key ``""``).
    stop_early : bool
        Abort the forward once every requested layer has run.
    clone : bool
        See :class:`LayerCapture`.

    Returns
    -------
    dict of str to torch.Tensor
        One tensor per layer, keyed by registered module name.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> capture(model, torch.randn(3, 4))[""].shape
    torch.Size([3, 2])
    """
    return LayerCapture(model, layers, stop_early=stop_early, clone=clone).run_inputs(inputs)
