"""Directional logit derivatives a = J_z(θ0)·v of a model with its parameters substituted functionally.

The probe evaluates the function being trained, with no side effects (README, docs/step.md): parameters (tied ones
wherever they appear) are substituted for its forward only; batch norms keep their mode, on cloned running
statistics; every other module is in eval mode and ``nn.MultiheadAttention``'s dropout is 0 (a dropout whose
probability ignores ``training`` cannot be seen, but the RNG is forked: the training stream is never consumed); no
autograd state is left behind; half-precision models are probed in float32. ``"jvp"`` is exact (forward-mode AD,
math attention kernel), ``"fd"`` the central difference with ``fd_step``, ``"auto"`` the JVP until an operation
has no forward-mode AD rule, then finite differences (a warning once, the reason in the slopes' ``note``).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ..norm import global_norm
from .base import (METHODS, Displacement, Slopes, central_difference, fd_step, forward_difference,
                   is_missing_forward_ad, probe_dtype)
from .inputs import Inputs, LogitsFn, as_batch, default_logits_fn, describe, map_tensors

__all__ = ["LogitProbe", "check_logits", "logits_of", "require_forward"]

# Kept in training mode during the probe: eval mode would change the function (norms using batch statistics) or
# switch torch's transformer layers to fused kernels that have no forward-AD rule.
_KEEP_MODE = (_NormBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
              nn.TransformerEncoder, nn.TransformerDecoder)
_HALF = (torch.bfloat16, torch.float16)

TensorDict = dict[str, Tensor]


def require_forward(model: nn.Module, logits_fn: LogitsFn | None) -> None:
    """Raise ValueError when the model cannot be called (no ``forward``) and no ``logits_fn`` says how to probe it."""
    if logits_fn is None and type(model).forward is nn.Module.forward:
        raise ValueError(f"{type(model).__name__} has no forward(), so SafeStep cannot call it to probe the logits "
                         "(a LightningModule whose training_step calls a submodule, say self.net). Pass the network "
                         "that produces the logits, SafeStep(optimizer, self.net) (the optimizer must optimize its "
                         "parameters), or say how to get them: logits_fn=lambda model, inputs: model.net(inputs)")


def logits_of(model: nn.Module, inputs: Inputs, logits_fn: LogitsFn | None) -> Tensor:
    """The logits of one probe call: the captured call replayed exactly, or ``logits_fn(model, as_batch(inputs))``."""
    return default_logits_fn(model, inputs) if logits_fn is None else check_logits(logits_fn(model, as_batch(inputs)))


def _attention_context() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no kernel selector; its math path is the default on CPU
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def _checkpoints_inline() -> Iterator[None]:
    """Inside the block, reentrant checkpoints call their function directly: as an autograd.Function without a
    forward-mode rule they would drop the tangent of every parameter inside them, and the probe keeps no graph to
    recompute. (The patch is process-wide while the block runs: another thread's checkpoints are not recomputed.)
    """
    from torch.utils import checkpoint

    function = getattr(checkpoint, "CheckpointFunction", None)
    if function is None:
        yield
        return
    own = function.__dict__.get("apply")  # None: inherited from autograd.Function
    function.apply = classmethod(lambda cls, run, preserve_rng_state, *args: run(*args))  # type: ignore[assignment]
    try:
        yield
    finally:
        if own is None:
            del function.apply
        else:
            function.apply = own


def check_logits(logits: object) -> Tensor:
    """What a user's ``logits_fn`` returned, if it is a floating (B, K) or (B, T, V) tensor; ValueError otherwise."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim < 2:
        raise ValueError(f"logits_fn returned {describe(logits)}; it must return the floating logits tensor of shape "
                         "(B, K) or (B, T, V)")
    return logits


class LogitProbe:
    """Directional logit derivatives of one dense model: ``along(params, step, inputs, method)`` -> Slopes for a
    guarded step, ``probe(params, direction, inputs, method)`` for named tensors and a given direction."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        require_forward(model, logits_fn)
        self.model = model
        self.logits_fn = logits_fn
        self.fallback = ""  # why "auto" uses finite differences; empty while the JVP works
        self._learn_modules()

    def _learn_modules(self) -> None:
        """Index the model's parameters, tensor slots and the modules whose mode the probe switches."""
        model = self.model
        self._params = list(model.parameters())
        self._places = _tensor_places(model)
        modules = list(model.named_modules())
        self._switchable = [m for _, m in modules if not isinstance(m, _KEEP_MODE)]
        self._attention = [m for _, m in modules if isinstance(m, nn.MultiheadAttention)]
        self._norms = [(name, m) for name, m in modules if isinstance(m, _NormBase)]
        self._batch_norms = [m for _, m in self._norms if isinstance(m, _BatchNorm)]
        self._names = {p: name for name, p in model.named_parameters()}  # keyed by the parameter: survives copies

    def uses_batch_statistics(self) -> bool:
        """True when a batch norm normalizes with batch statistics (the batch rows are then coupled)."""
        return any(m.training or m.running_mean is None for m in self._batch_norms)

    def names(self, params: Sequence[Tensor]) -> list[str]:
        """The model's names of ``params`` (ValueError for a tensor that is not one of its parameters); a module
        attached to the model after the probe was built is learned here."""
        if any(p not in self._names for p in params):
            self._learn_modules()
        try:
            return [self._names[p] for p in params]
        except KeyError:
            raise ValueError("a tensor to probe is not a parameter of the probed model") from None

    def along(self, params: Sequence[Tensor], step: Displacement, inputs: Inputs, method: str,
              reference: Tensor | None = None) -> Slopes:
        """a = J_z(θ0)·Δθ/τ; ``params`` are the live parameters (holding θ1 = θ0 + Δθ), in ``step``'s order. Method
        "reuse" takes ``reference`` = z(θ0) from the training forward and runs one forward at θ0 + h·v."""
        names = self.names(params)
        theta0 = dict(zip(names, step.theta0))

        def fd_point(weight: Tensor) -> TensorDict:  # θ0 + w·Δθ as lerp(θ0, θ1, w), in the probe dtype
            dtype = self._compute_dtype(theta0)
            start = [t.to(dtype) for t in step.theta0]
            return dict(zip(names, torch._foreach_lerp(start, [p.detach().to(dtype) for p in params], weight)))

        def finite_difference() -> Slopes:
            h = fd_step(step.theta_norm, step.theta0[0].dtype)
            return self._central_difference(fd_point, h * step.inverse_tau, h, inputs)

        if method == "reuse":
            if reference is None:
                raise ValueError("method='reuse' needs the training forward's logits z(θ0) for these inputs")
            h = fd_step(step.theta_norm, step.theta0[0].dtype, one_sided=True)
            with self.deterministic(), torch.no_grad():
                plus = self._logits(fd_point(h * step.inverse_tau), inputs)
            return forward_difference(reference.detach().to(plus.dtype), plus, h)
        return self._measure(theta0, dict(zip(names, step.delta)), step.inverse_tau, finite_difference, inputs, method)

    def __call__(self, params: TensorDict, direction: TensorDict, inputs: Inputs, method: str = "auto") -> Slopes:
        """a = J_z(θ0)·v at ``params`` (θ0 by name) along ``direction`` (v, same names; unit norm for slopes per
        unit τ); parameters not named keep their current value and have zero tangent."""
        if params.keys() != direction.keys():
            raise ValueError("params and direction must name the same tensors")
        mismatched = [name for name, theta in params.items() if direction[name].shape != theta.shape]
        if mismatched:
            raise ValueError(f"direction and params differ in shape for {', '.join(mismatched[:3])}")
        names = list(params)
        theta = [params[n] for n in names]
        v = [direction[n] for n in names]

        def fd_point(weight: float) -> TensorDict:
            dtype = self._compute_dtype(params)
            moved = torch._foreach_add([t.to(dtype) for t in theta], [t.to(dtype) for t in v], alpha=weight)
            return dict(zip(names, moved))

        def finite_difference() -> Slopes:
            h = float(fd_step(global_norm(theta), theta[0].dtype))
            return self._central_difference(fd_point, h, h, inputs)

        return self._measure(params, direction, 1.0, finite_difference, inputs, method)

    def _measure(self, theta: TensorDict, tangent: TensorDict, tangent_scale: Tensor | float,
                 finite_difference: Callable[[], Slopes], inputs: Inputs, method: str) -> Slopes:
        if method not in METHODS or method == "reuse":
            raise ValueError(f"method must be one of {METHODS[:3]} here, got {method!r}")
        with self.deterministic(), torch.no_grad():
            if method == "fd" or (method == "auto" and self.fallback):
                return finite_difference()
            try:
                return self._jvp(theta, tangent, tangent_scale, inputs)
            except (NotImplementedError, RuntimeError) as error:
                if not is_missing_forward_ad(error):
                    raise
                reason = str(error).strip().splitlines()[0]
                if method == "jvp":
                    raise ValueError(f"method='jvp' cannot probe this model: {reason}; use method='auto' (finite "
                                     "differences where forward-mode AD is missing) or method='fd'") from error
                self.fallback = reason
            warnings.warn(f"safestep: an operation of {type(self.model).__name__} has no forward-mode AD rule "
                          f"({reason}); method='auto' uses central finite differences from now on",
                          RuntimeWarning, stacklevel=4)
            slopes = finite_difference()
            return Slopes(slopes.logits, slopes.slopes, "fd", f"no forward-mode AD rule ({reason}): finite differences")

    def _jvp(self, theta: TensorDict, tangent: TensorDict, tangent_scale: Tensor | float, inputs: Inputs) -> Slopes:
        dtype = self._compute_dtype(theta)
        with _attention_context(), _checkpoints_inline(), forward_ad.dual_level():
            duals = {n: forward_ad.make_dual(t.to(dtype), tangent[n].to(dtype)) for n, t in theta.items()}
            logits, slopes = forward_ad.unpack_dual(self._logits(duals, inputs, dtype))
        if slopes is None:
            return Slopes(logits, torch.zeros_like(logits), "jvp")
        return Slopes(logits, slopes * tangent_scale, "jvp")

    def _central_difference(self, point: Callable[[Tensor | float], TensorDict], weight: Tensor | float,
                            h: Tensor | float, inputs: Inputs) -> Slopes:
        """(z(θ0 + hv) − z(θ0 − hv))/2h; ``point(w)`` builds the parameters at θ0 + w·(tangent), one at a time."""
        return central_difference(self._logits(point(weight), inputs), self._logits(point(-weight), inputs), h)

    def _compute_dtype(self, tensors: TensorDict) -> torch.dtype:
        """The probe dtype: float32 when any probed or model tensor is half precision, else the narrowest dtype."""
        narrowest = min((t.dtype for t in (*tensors.values(), *self._params) if t.is_floating_point()),
                        key=lambda d: torch.finfo(d).bits, default=torch.float32)
        return probe_dtype(narrowest)

    def _logits(self, tensors: TensorDict, inputs: Inputs, dtype: torch.dtype | None = None) -> Tensor:
        """z at the given tensors (others at their live values), in ``dtype`` (default: the probe dtype)."""
        dtype = dtype or self._compute_dtype(tensors)
        state = {name: t if t.dtype == dtype else t.to(dtype) for name, t in tensors.items()}
        if any(p.dtype in _HALF for p in self._params):  # every half-precision tensor is probed in float32
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
                if t.dtype in _HALF:
                    state.setdefault(name, t.detach().to(dtype))
            inputs = map_tensors(inputs, lambda t: t.to(dtype) if t.dtype in _HALF else t)
        for name, m in self._norms:  # running statistics are cloned so the module's buffers never change
            if m.training and m.track_running_stats:
                for buf_name, buf in m.named_buffers(recurse=False):
                    key = f"{name}.{buf_name}" if name else buf_name
                    state[key] = state[key].clone() if key in state else buf.clone()
        if not state.keys() <= self._places.keys():  # a tensor registered after construction
            self._places = _tensor_places(self.model)
        with _substituted(self._places, state):
            return logits_of(self.model, inputs, self.logits_fn)

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Within the block the model is its deterministic self: no dropout, and the RNG streams are untouched."""
        switched = [m for m in self._switchable if m.training]
        attention = [(m, m.dropout) for m in self._attention]
        cuda = sorted({p.device.index or 0 for p in self._params if p.device.type == "cuda"})
        try:
            for m in switched:
                m.training = False
            for m, _ in attention:
                m.dropout = 0.0
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                yield
        finally:
            for m in switched:
                m.training = True
            for m, p in attention:
                m.dropout = p


Places = dict[str, list[tuple[dict, str]]]


def _tensor_places(model: nn.Module) -> Places:
    """For every parameter and buffer name (as ``named_parameters``/``named_buffers`` give it), each
    (module._parameters or module._buffers, attribute) slot that holds that tensor: tied tensors hold several."""
    names = {id(t): name for name, t in (*model.named_parameters(), *model.named_buffers())}
    places: Places = {name: [] for name in names.values()}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for attr, tensor in table.items():
                if tensor is not None and id(tensor) in names:
                    places[names[id(tensor)]].append((table, attr))
    return places


@contextlib.contextmanager
def _substituted(places: Places, state: TensorDict) -> Iterator[None]:
    """The model with ``state``'s tensors in place of its own (by name) inside the block; its own restored after."""
    saved: list[tuple[dict, str, Tensor]] = []
    try:
        for name, tensor in state.items():
            for table, attr in places[name]:
                saved.append((table, attr, table[attr]))
                table[attr] = tensor
        yield
    finally:
        for table, attr, original in reversed(saved):
            table[attr] = original
