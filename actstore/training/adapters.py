"""LoRA adapters on the head from :func:`actstore.split`, through ``peft``'s own API.

The head returned by ``split`` is an ordinary ``nn.Module`` holding the
model's own blocks above the cut, so ``peft.get_peft_model(head,
LoraConfig(...))`` works on it unchanged; :func:`lora` is that one call with
defaults that fit a head (every linear layer of it) and an error that lists
the head's module names when a target is not found.

Adapters live above the cut: peft replaces linear layers inside the head's
blocks only, so the frozen part's fingerprint (and with it every store
precomputed from it) is unchanged, and training from the store needs nothing
else: ``[p for p in adapted.parameters() if p.requires_grad]`` are the
adapter weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from actstore.errors import MissingDependencyError

__all__ = ["linear_module_names", "lora", "trainable_parameters"]


def linear_module_names(head: nn.Module) -> list[str]:
    """The qualified names of the head's ``nn.Linear`` modules (what LoRA can target)."""
    return [name for name, m in head.named_modules() if isinstance(m, nn.Linear)]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` with ``requires_grad`` set (after :func:`lora`: the adapter weights only)."""
    return [p for p in module.parameters() if p.requires_grad]


def lora(head: nn.Module, target_modules: str | Sequence[str] = "all-linear", *, r: int = 8, alpha: int = 16,
         dropout: float = 0.0, **config: Any) -> Any:
    """Wrap ``head`` in a ``peft`` LoRA model with only the adapter weights trainable.

    This is ``peft.get_peft_model(head, peft.LoraConfig(r=r, lora_alpha=alpha,
    lora_dropout=dropout, target_modules=target_modules, **config))``; the
    result is a ``peft.PeftModel`` whose ``forward`` is the head's (same
    inputs, same output type). The head's modules are shared with the model
    ``split`` came from, so the model runs the adapters too; the frozen part
    is untouched.

    Parameters
    ----------
    head : torch.nn.Module
        The head from ``split`` (or any module).
    target_modules : str or sequence of str
        Passed to ``LoraConfig``: module name suffixes or a regular
        expression; ``"all-linear"`` (the default) targets every linear
        layer of the head.
    r, alpha, dropout : int, int, float
        LoRA rank, scaling ``lora_alpha`` and ``lora_dropout``.
    **config
        Any other ``LoraConfig`` argument (``bias``, ``modules_to_save``, ...).

    Returns
    -------
    peft.PeftModel
        The adapted head (``.print_trainable_parameters()``, ``.merge_and_unload()``).

    Raises
    ------
    MissingDependencyError
        peft is not installed (``pip install 'actstore[adapters]'``).
    ValueError
        peft's own error (the same type) when a target module is not in the
        head, with the head's linear module names listed.

    Examples
    --------
    >>> frozen, head = actstore.split(model, 0.5)           # doctest: +SKIP
    >>> adapted = actstore.lora(head, ["query", "value"])   # doctest: +SKIP
    >>> opt = torch.optim.AdamW(actstore.trainable_parameters(adapted), lr=1e-4)  # doctest: +SKIP
    """
    try:
        import peft
    except ImportError as e:
        raise MissingDependencyError("LoRA adapters need peft: pip install 'actstore[adapters]' (or pip install "
                                     "peft)") from e
    targets: Any = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **config)
    try:
        return peft.get_peft_model(head, cfg)
    except ValueError as e:
        names = linear_module_names(head)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        msg = (f"{e} The head ({type(head).__name__}) has these linear modules: {shown or 'none'}; name targets "
               "by these names or their last parts (e.g. 'query'), or use target_modules='all-linear'.")
        try:
            err = type(e)(msg)
        except TypeError:  # an error type with another constructor: keep peft's, add the names as a note
            e.add_note(msg)
            raise
        raise err from e
