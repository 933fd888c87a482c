"""The batch a probe replays: model-call forms, capture of the training call, batch size and row subsets.

A captured call is replayed exactly as the model was called (``CallArgs``); explicit inputs follow ``call_model``.
Containers nest (dicts, lists, tuples, named tuples); every tensor leaf of leading size B is a batched input.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn

__all__ = ["CallArgs", "Inputs", "LogitsFn", "call_model", "extract_logits", "describe", "default_logits_fn",
           "as_batch", "map_tensors", "batch_size", "shared_leaves", "take_rows", "Scorer",
           "InputCapture"]


class CallArgs(NamedTuple):
    """Positional and keyword arguments of one model call, replayed as ``model(*args, **kwargs)``."""

    args: tuple
    kwargs: dict


Inputs = Union[Tensor, tuple, list, dict, CallArgs]
LogitsFn = Callable[[nn.Module, Any], Tensor]


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """model(x) for a tensor, model(*x) for a tuple/list, model(**x) for a dict, model(*a, **kw) for CallArgs."""
    if isinstance(inputs, CallArgs):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def extract_logits(output: Any) -> Tensor:
    """The logits in a model output: the tensor itself, ``output.logits``, ``output["logits"]`` or the first tensor
    of a tuple/list with at least two dimensions (``(loss, logits)``). ValueError, saying what was received, when
    none of these is a floating tensor with a class dimension."""
    found: Any = output
    if isinstance(getattr(output, "logits", None), Tensor):
        found = output.logits
    elif isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        found = output["logits"]
    elif isinstance(output, (tuple, list)):
        found = next((t for t in output if isinstance(t, Tensor) and t.ndim >= 2), None)
    if isinstance(found, Tensor) and found.is_floating_point() and found.ndim >= 2:
        return found
    raise ValueError(f"the model returned {describe(output)}, not logits of shape (B, K) or (B, T, V); SafeStep "
                     "probes the logits, so point it at them: logits_fn=lambda model, inputs: ... returning the "
                     "logits tensor (e.g. model.logits_of(inputs), or the second element when the forward returns "
                     "(loss, logits) for some inputs only)")


def describe(output: Any) -> str:
    """A short description of a model output for an error message (a 0-dim tensor is most likely a loss)."""
    if isinstance(output, Tensor):
        kind = "a 0-dim tensor (a loss?)" if output.ndim == 0 else f"a tensor of shape {tuple(output.shape)}"
        return kind if output.is_floating_point() else f"{kind} of dtype {output.dtype}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {', '.join(describe(o) for o in output[:3])}"
    return f"an object of type {type(output).__name__}"


def default_logits_fn(model: nn.Module, inputs: Inputs) -> Tensor:
    """Call the model on the inputs and return its logits (see ``call_model`` and ``extract_logits``)."""
    return extract_logits(call_model(model, inputs))


def as_batch(inputs: Inputs) -> Any:
    """The batch as a user sees it (what ``logits_fn`` and ``labels_fn`` receive): a captured ``model(x)`` gives x,
    ``model(**kw)`` gives the dict kw, ``model(a, b)`` gives (a, b); explicit inputs are returned as they are."""
    if not isinstance(inputs, CallArgs):
        return inputs
    if not inputs.kwargs:
        return inputs.args[0] if len(inputs.args) == 1 else inputs.args
    return dict(inputs.kwargs) if not inputs.args else inputs


def map_tensors(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The same nested structure with every tensor leaf t replaced by fn(t) (containers rebuilt, other leaves kept)."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, CallArgs):
        return CallArgs(map_tensors(inputs.args, fn), map_tensors(inputs.kwargs, fn))
    if isinstance(inputs, Mapping):
        return {key: map_tensors(value, fn) for key, value in inputs.items()}
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):  # a named tuple: rebuild field by field
        return type(inputs)(*(map_tensors(value, fn) for value in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(value, fn) for value in inputs)
    return inputs


def batch_size(inputs: Inputs) -> int:
    """B = the leading size of the first tensor with at least one dimension among the (nested) inputs."""
    for _, leaf in _leaf_paths(inputs):
        if leaf.ndim > 0:
            return leaf.shape[0]
    raise ValueError("the inputs hold no tensor with a batch dimension; cannot probe them")


def _leaf_paths(inputs: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """(a readable path, tensor) of every tensor inside (nested dicts, lists, tuples, CallArgs), depth first."""
    if isinstance(inputs, Tensor):
        yield prefix or "input", inputs
    elif isinstance(inputs, CallArgs):
        yield from _leaf_paths(inputs.args, prefix)
        yield from _leaf_paths(inputs.kwargs, prefix)
    elif isinstance(inputs, Mapping):
        for key, value in inputs.items():
            yield from _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(inputs, (tuple, list)):
        for index, value in enumerate(inputs):
            yield from _leaf_paths(value, f"{prefix}[{index}]")


def shared_leaves(inputs: Inputs, batch: int) -> list[str]:
    """The inputs whose leading size equals the batch size only by coincidence with the sequence length: when the
    batch-defining tensor is (B, T, ...) with T = B, any other tensor of leading size B (position ids (T,), a (T, T)
    mask, or a per-row (B,) vector) cannot be told per-row from per-position. Empty when there is no doubt."""
    leaves = [(path, t) for path, t in _leaf_paths(inputs) if t.ndim > 0]
    if not leaves or leaves[0][1].ndim < 2 or leaves[0][1].shape[1] != batch:
        return []
    return [path for path, t in leaves[1:] if t.shape[0] == batch]


def take_rows(inputs: Inputs, rows: Tensor, batch: int) -> Inputs:
    """The inputs restricted to batch rows ``rows``: every tensor whose leading size is ``batch`` is indexed."""

    def pick(leaf: Tensor) -> Tensor:
        if leaf.ndim > 0 and leaf.shape[0] == batch:
            return leaf.index_select(0, rows.to(leaf.device))
        return leaf

    return map_tensors(inputs, pick)


Scorer = Callable[[CallArgs, Any], "Tensor | None"]
"""scorer(call, output) -> one score per batch row, computed from a training forward's output (or None)."""


class InputCapture:
    """Forward hooks that keep the arguments of the model's latest gradient-recording call (``CallArgs``, by
    reference, until ``take()``; the output is not kept) and optionally ``scorer(call, output)`` of that call (row
    scores; a scorer that raises leaves them None: it must never break the user's forward). Calls without grad or
    while ``paused()`` are ignored."""

    def __init__(self, model: nn.Module, scorer: Scorer | None = None) -> None:
        self.latest: CallArgs | None = None
        self.scores: Tensor | None = None
        self.scorer = scorer
        self._paused = False
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True)]
        if scorer is not None:
            self._handles.append(model.register_forward_hook(self._after))

    def _recording(self) -> bool:
        return not self._paused and torch.is_grad_enabled()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording():
            self.latest = CallArgs(tuple(args), dict(kwargs))
            self.scores = None

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._recording() and self.latest is not None and self.scorer is not None:
            try:
                self.scores = self.scorer(self.latest, output)
            except Exception:  # noqa: BLE001 -- a score is a hint; the forward must not fail because of it
                self.scores = None

    def pop(self) -> CallArgs | None:
        """Return the captured call (or None) and forget it and its scores."""
        return self.take()[0]

    def take(self) -> tuple[CallArgs | None, Tensor | None]:
        """(the captured call, its row scores) and forget both."""
        latest, scores = self.latest, self.scores
        self.latest, self.scores = None, None
        return latest, scores

    def put_back(self, call: CallArgs | None, scores: Tensor | None) -> None:
        """Restore what ``take`` returned (a failed step keeps its batch) unless a newer call was captured."""
        if self.latest is None:
            self.latest, self.scores = call, scores

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore model calls inside the block (the probe's own forwards)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
