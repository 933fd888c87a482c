"""Directional logit derivatives a = J_z(θ0)·v of a model along a parameter direction (MATH_RADIUS.md §A4).

The probe evaluates the *same function that is trained*, at the parameters it is given, with no side effects:

* parameters are substituted with ``torch.func.functional_call`` (the live module is never written);
* batch norms keep their mode: in train mode they use the probe batch's statistics, and their running
  statistics are cloned inside the probe so the module's buffers never change;
* the network is probed deterministically: every module except norms and torch's transformer layers is put
  in eval mode for the duration of the probe (dropout modules, RReLU, and attention dropout that a module reads
  from its own ``training`` flag), and ``nn.MultiheadAttention`` dropout is set to 0 (a dropout call whose
  probability ignores ``training`` cannot be seen; the RNG is forked, so even then the training random stream
  is never consumed);
* no autograd state is left behind: no ``.grad`` changes, no graph and no open forward-AD level (slopes come
  from dual tensors of ``torch.autograd.forward_ad`` or from finite differences, under ``torch.no_grad``),
  and no reference cycles, so nothing waits for the garbage collector;
* the JVP runs with the math attention kernel (flash / memory-efficient kernels have no forward-AD rule).

Estimators: ``"jvp"`` (forward-mode AD, exact), ``"fd"`` (central difference z(θ0 ± hv) with
h = eps_dtype^{1/3}·max(1, ‖θ0‖), logits taken as the midpoint average), ``"auto"`` (JVP, falling back to FD
when a module has no forward-AD rule).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

__all__ = [
    "CallArgs",
    "Inputs",
    "LogitsFn",
    "METHODS",
    "Slopes",
    "LogitProbe",
    "InputCapture",
    "call_model",
    "extract_logits",
    "default_logits_fn",
    "batch_size",
    "take_rows",
    "probe_rows",
]

METHODS = ("auto", "jvp", "fd")


class CallArgs(NamedTuple):
    """Positional and keyword arguments of a model call (used when both kinds were given)."""

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
    """The logits in a model output: the tensor itself, ``output.logits``, ``output["logits"]`` or ``output[0]``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "pass logits_fn=lambda model, inputs: ... returning the (B, K) or (B, T, V) logits tensor"
    )


def default_logits_fn(model: nn.Module, inputs: Inputs) -> Tensor:
    """Call the model on the inputs and return its logits (see ``call_model`` and ``extract_logits``)."""
    return extract_logits(call_model(model, inputs))


def inputs_from_call(args: tuple, kwargs: dict) -> Inputs:
    """The Inputs form of a captured call: x, a tuple of positionals, a dict of keywords, or CallArgs."""
    if not kwargs:
        return args[0] if len(args) == 1 else tuple(args)
    if not args:
        return dict(kwargs)
    return CallArgs(tuple(args), dict(kwargs))


def _leaves(inputs: Inputs) -> Iterator[Any]:
    if isinstance(inputs, CallArgs):
        yield from inputs.args
        yield from inputs.kwargs.values()
    elif isinstance(inputs, Mapping):
        yield from inputs.values()
    elif isinstance(inputs, (tuple, list)):
        yield from inputs
    else:
        yield inputs


def batch_size(inputs: Inputs) -> int:
    """B = the leading size of the first tensor with at least one dimension among the inputs."""
    for leaf in _leaves(inputs):
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    raise ValueError("the inputs hold no tensor with a batch dimension; cannot probe them")


def take_rows(inputs: Inputs, rows: Tensor, batch: int) -> Inputs:
    """The inputs restricted to batch rows ``rows``: every tensor whose leading size is ``batch`` is indexed."""

    def pick(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == batch:
            return leaf.index_select(0, rows.to(leaf.device))
        return leaf

    if isinstance(inputs, CallArgs):
        return CallArgs(tuple(pick(a) for a in inputs.args), {k: pick(v) for k, v in inputs.kwargs.items()})
    if isinstance(inputs, Mapping):
        return {k: pick(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(pick(a) for a in inputs)
    return pick(inputs)


def probe_rows(batch: int, probe_size: int | None) -> Tensor | None:
    """A fixed, evenly strided subset of ``probe_size`` rows of a batch of ``batch`` (None = all rows)."""
    if probe_size is None or probe_size >= batch:
        return None
    return torch.div(torch.arange(probe_size) * batch, probe_size, rounding_mode="floor")


@dataclass(frozen=True)
class Slopes:
    """Logits z(θ0) and slopes a = dz/dτ along a unit direction, both (..., K); ``method`` says how."""

    logits: Tensor
    slopes: Tensor
    method: str


class _LogitsModule(nn.Module):
    """Wraps model + logits_fn so that functional_call substitutes parameters inside logits_fn."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn) -> None:
        super().__init__()
        self.model = model
        self.logits_fn = logits_fn

    def forward(self, inputs: Inputs) -> Tensor:
        return self.logits_fn(self.model, inputs)


# Modules kept in their training mode during the probe: eval mode would change the function (norms using batch
# statistics) or switch torch's transformer layers to fused kernels that have no forward-AD rule. Every other
# module is put in eval mode (no dropout masks, including attention dropout read from ``self.training``), and
# nn.MultiheadAttention's dropout probability is zeroed instead.
_KEEP_MODE = (_NormBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
              nn.TransformerEncoder, nn.TransformerDecoder)


def _attention_context() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no kernel selector; its math path is the default on CPU
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class LogitProbe:
    """Directional logit derivatives of one model: ``probe(params, direction, inputs, method)`` -> Slopes."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        self.model = model
        self._wrapper = _LogitsModule(model, logits_fn or default_logits_fn)
        modules = list(model.named_modules())
        self._switchable = [m for _, m in modules if not isinstance(m, _KEEP_MODE)]
        self._attention = [m for _, m in modules if isinstance(m, nn.MultiheadAttention)]
        self._norms = [(name, m) for name, m in modules if isinstance(m, _NormBase)]
        self._batch_norms = [m for _, m in self._norms if isinstance(m, _BatchNorm)]
        self._jvp_unsupported = False  # set when "auto" met a module without a forward-AD rule

    def uses_batch_statistics(self) -> bool:
        """True when a batch norm normalizes with batch statistics (the batch rows are then coupled)."""
        return any(m.training or m.running_mean is None for m in self._batch_norms)

    def __call__(self, params: dict[str, Tensor], direction: dict[str, Tensor], inputs: Inputs,
                 method: str = "auto") -> Slopes:
        """a = J_z(θ0)·v: logits and slopes at ``params`` (θ0, by name) along ``direction`` (v, same names).

        Parameters not named in ``params`` keep their current value and have zero tangent. ``direction``
        should have unit norm for a to be the slope per unit step length.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if params.keys() != direction.keys():
            raise ValueError("params and direction must name the same tensors")
        mismatched = [name for name, theta in params.items() if direction[name].shape != theta.shape]
        if mismatched:
            raise ValueError(f"direction and params differ in shape for {', '.join(mismatched[:3])}")
        with self.deterministic(), torch.no_grad():
            if method == "fd" or (method == "auto" and self._jvp_unsupported):
                return self._finite_difference(params, direction, inputs)
            try:
                return self._jvp(params, direction, inputs)
            except (RuntimeError, NotImplementedError):
                if method == "jvp":
                    raise
                self._jvp_unsupported = True
            return self._finite_difference(params, direction, inputs)

    def _logits(self, tensors: dict[str, Tensor], inputs: Inputs) -> Tensor:
        state = {"model." + name: t for name, t in tensors.items()}
        for name, m in self._norms:  # running statistics are cloned so the module's buffers never change
            if m.training and m.track_running_stats:
                for buf_name, buf in m.named_buffers(recurse=False):
                    state[f"model.{name}.{buf_name}" if name else f"model.{buf_name}"] = buf.clone()
        logits = functional_call(self._wrapper, state, (inputs,))
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim < 2:
            raise ValueError("logits_fn must return a floating tensor of shape (B, K) or (B, T, V)")
        return logits

    def _jvp(self, params: dict[str, Tensor], direction: dict[str, Tensor], inputs: Inputs) -> Slopes:
        with _attention_context(), forward_ad.dual_level():
            duals = {name: forward_ad.make_dual(theta, direction[name]) for name, theta in params.items()}
            logits, slopes = forward_ad.unpack_dual(self._logits(duals, inputs))
        return Slopes(logits, torch.zeros_like(logits) if slopes is None else slopes, "jvp")

    def _finite_difference(self, params: dict[str, Tensor], direction: dict[str, Tensor], inputs: Inputs) -> Slopes:
        names = list(params)
        theta = [params[n] for n in names]
        v = [direction[n] for n in names]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(theta)).float()).item()
        h = torch.finfo(theta[0].dtype).eps ** (1 / 3) * max(1.0, norm)
        plus = self._logits(dict(zip(names, torch._foreach_add(theta, v, alpha=h))), inputs)
        minus = self._logits(dict(zip(names, torch._foreach_add(theta, v, alpha=-h))), inputs)
        return Slopes((plus + minus) / 2, (plus - minus) / (2 * h), "fd")

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Within the block the model is its deterministic self: no dropout, and the RNG streams are untouched."""
        switched = [m for m in self._switchable if m.training]
        attention = [(m, m.dropout) for m in self._attention]
        cuda = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        try:
            for m in switched:
                m.training = False
            for m, _ in attention:
                m.dropout = 0.0
            with torch.random.fork_rng(devices=cuda):
                yield
        finally:
            for m in switched:
                m.training = True
            for m, p in attention:
                m.dropout = p


class InputCapture:
    """A forward pre-hook that keeps the inputs of the model's latest gradient-recording call.

    Calls under ``torch.no_grad()``/``inference_mode`` (evaluation) and calls made while ``paused()`` are
    ignored. The inputs are held by reference (no copy) until ``pop()``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.latest: Inputs | None = None
        self._paused = False
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._paused and torch.is_grad_enabled():
            self.latest = inputs_from_call(args, kwargs)

    def pop(self) -> Inputs | None:
        """Return the captured inputs (or None) and forget them."""
        latest, self.latest = self.latest, None
        return latest

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore model calls inside the block (the probe's own forwards)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def remove(self) -> None:
        """Unregister the hook."""
        self._handle.remove()
