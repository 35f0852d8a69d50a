"""Loss functions for training a binary classifier on soft (weak) labels.

Every loss is a small frozen dataclass whose fields are its parameters, registered by name with
:func:`register_loss`, and called as ``loss(logits, labels, step_frac)``:

* ``logits``: ``(batch, 2)`` float, the student's class logits;
* ``labels``: ``(batch, 2)`` soft-label probabilities (each row sums to 1; one-hot for ground truth);
* ``step_frac``: fraction of training done, in ``[0, 1]`` (for warm-up schedules).

The result is a scalar tensor, the mean over the batch. All losses compute in float32 so that bf16/fp16
logits do not lose precision in the softmax.

Gradient accumulation. The trainer may split an optimizer batch into minibatches and sum their losses,
each weighted by its share of the batch; that equals the loss of the whole batch only for a loss that
is a mean of per-example terms. A loss that also uses statistics of the whole batch (``logconf``'s
quantile threshold and weak-label prior) declares them::

    def batch_statistics(self, logits, labels, step_frac) -> dict[str, torch.Tensor]: ...
    def __call__(self, logits, labels, step_frac, stats=None) -> torch.Tensor: ...

The trainer computes the statistics once over the whole batch (without gradients) and hands them to
every minibatch's call; called without ``stats``, the loss computes them from what it is given, which
is the whole batch. :func:`check_minibatch_invariance` tells a loss that is not a per-example mean and
declares no statistics, so a plug-in cannot silently change meaning under accumulation.

Sources of the definitions:

* ``xent``, ``logconf``, ``product``: openai/weak-to-strong, ``weak_to_strong/loss.py``
  (``xent_loss``, ``logconf_loss_fn``, ``product_loss_fn``).
* ``window``, ``entropy``, ``kl``: EleutherAI/w2s, ``w2s/loss.py`` (``confidence_window_loss``,
  ``log_confidence_loss(..., harden=False)`` as dispatched for ``"entropy"`` in ``w2s/sft.py``,
  ``kl_divergence_loss``), adapted from training steps to ``step_frac`` and from 1-D to ``(batch, 2)``
  labels.

Your own loss. A loss of your own is a class like the ones below, registered under a name. It
reaches every process that looks losses up (``w2s run``, the service's API, its control and stage
workers, and the fresh process each full or LoRA stage runs in) by one of two plug-in routes, both
loaded the first time a process looks up a loss it has not registered, or lists them
(:func:`load_plugins`):

* an entry point in the group ``w2s.losses`` of an installed package: ``name = "pkg.mod:Class"``
  registers ``Class`` as ``name``; ``name = "pkg.mod"`` imports a module whose ``@register_loss``
  decorators register its losses;
* the setting ``W2S_LOSS_MODULES`` (``pkg.mod,other``): modules imported for their registrations.

So the package or module must be importable on every host that runs the API, ``w2s run`` or a
worker (examples/custom_loss/ is a complete one; README, "Your own loss")::

    @register_loss("mine")
    @dataclass(frozen=True)
    class MyLoss:
        \"\"\"One-line description shown by `w2s losses`.\"\"\"

        scale: float = 1.0  # a parameter: {"name": "mine", "scale": 2.0} in a spec

        def __call__(self, logits, labels, step_frac):
            return self.scale * F.cross_entropy(logits.float(), labels.float())

    loss = build_loss("mine", {"scale": 2.0})

The contract, as the built-ins keep it: a (frozen) dataclass whose fields, typed ``float``, ``int``,
``bool`` or ``str``, are its parameters (checked against those types; range checks go in
``__post_init__`` and raise ValueError naming the field); ``__call__`` returns the batch mean,
differentiable in ``logits``, and is exact under gradient accumulation: a mean of per-example terms,
or whole-batch statistics declared with ``batch_statistics`` as above (a loss that is neither is
refused when a spec accumulates). A loss that keeps state across steps saves it for resume
checkpoints with ``state_dict()`` / ``load_state_dict(state)`` (w2s.resume).

The stage key of every student trained with a plug-in hashes the source file of the module that
defines its class, as it was when the class was registered (:func:`loss_source`): editing that file
recomputes those students instead of serving their old numbers. Code it imports from other modules
is not hashed: keep what computes the loss in that file.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import math
import sys
import typing
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "ENTRY_POINT_GROUP",
    "EntropyLoss",
    "KLLoss",
    "LogConfLoss",
    "Loss",
    "LossPluginError",
    "ProductLoss",
    "UnknownLoss",
    "WindowLoss",
    "XentLoss",
    "batch_statistics",
    "build_loss",
    "check_minibatch_invariance",
    "describe_loss",
    "load_plugins",
    "loss_module",
    "loss_names",
    "loss_params",
    "loss_source",
    "minibatch_loss",
    "register_loss",
]


@runtime_checkable
class Loss(Protocol):
    """A training loss: ``(logits (B, 2), labels (B, 2), step_frac) -> scalar tensor``."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor: ...


Stats = dict[str, torch.Tensor]


def batch_statistics(
    loss: Loss, logits: torch.Tensor, labels: torch.Tensor, step_frac: float
) -> Stats | None:
    """The loss's statistics of a whole batch (computed without gradients), or None if it has none."""
    compute = getattr(loss, "batch_statistics", None)
    if compute is None:
        return None
    with torch.no_grad():
        return compute(logits.detach(), labels, step_frac)


def minibatch_loss(
    loss: Loss, logits: torch.Tensor, labels: torch.Tensor, step_frac: float, stats: Stats | None
) -> torch.Tensor:
    """The loss of one minibatch, given the whole batch's statistics (None: the loss has none)."""
    if stats is None:
        return loss(logits, labels, step_frac)
    return loss(logits, labels, step_frac, stats=stats)  # type: ignore[call-arg]


def check_minibatch_invariance(loss: Loss, *, batch: int = 12) -> None:
    """Raise ValueError if splitting a batch into minibatches changes the loss or its gradient.

    A seeded random batch is scored whole and in uneven minibatches (5 + 7, and 12 x 1), with the
    batch statistics the loss declares, at a step inside and one after a typical warm-up.
    """
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, 2, generator=generator) * 2.0
    p = torch.rand(batch, generator=generator)
    labels = torch.stack([1.0 - p, p], dim=1)
    for step_frac in (0.05, 0.5):
        whole = logits.clone().requires_grad_(True)
        expected = loss(whole, labels, step_frac)
        expected.backward()
        for sizes in ((5, batch - 5), (1,) * batch):
            stats = batch_statistics(loss, logits, labels, step_frac)
            parts = logits.clone().requires_grad_(True)
            total = torch.zeros(())
            start = 0
            for size in sizes:
                piece = slice(start, start + size)
                total = total + minibatch_loss(loss, parts[piece], labels[piece], step_frac, stats) * (
                    size / batch
                )
                start += size
            total.backward()
            assert whole.grad is not None and parts.grad is not None
            if not (
                torch.allclose(total, expected, rtol=1e-5, atol=1e-6)
                and torch.allclose(parts.grad, whole.grad, rtol=1e-4, atol=1e-6)
            ):
                name = _registered_name(type(loss)) or type(loss).__qualname__
                raise ValueError(
                    f"loss {name!r} changes when a batch is split into minibatches (whole batch "
                    f"{expected.item():.6f}, minibatches of {sizes[0]}: {total.item():.6f}): it uses "
                    "statistics of the whole batch; declare them with batch_statistics(logits, labels, "
                    "step_frac) and accept stats= in __call__ (see w2s.losses)"
                )


def _registered_name(cls: type) -> str | None:
    return next((name for name, registered in _REGISTRY.items() if registered is cls), None)


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

# Installed packages offer losses of their own under this entry-point group (see the module docstring).
ENTRY_POINT_GROUP = "w2s.losses"
PLUGIN_HOW_TO = (
    "a loss of your own must be importable on every host that runs the API, `w2s run` or a worker: "
    f"install its package (an entry point in the group {ENTRY_POINT_GROUP}) or list its module in "
    "W2S_LOSS_MODULES (README, 'Your own loss')"
)

_REGISTRY: dict[str, type] = {}
# What a plug-in's stage keys hash of its code, captured when it was registered (see loss_source).
_SOURCES: weakref.WeakKeyDictionary[type, bytes] = weakref.WeakKeyDictionary()
_plugins_loaded = False  # load_plugins ran to the end in this process
_plugins_loading = False  # ... or is running: a plug-in that looks a loss up while it is imported


class UnknownLoss(ValueError):
    """No loss of this name is registered in this process, even after loading the plug-ins; ``loss``
    is the name asked for."""

    loss: object = None


class LossPluginError(ValueError):
    """A loss plug-in that W2S_LOSS_MODULES or an installed entry point names cannot be loaded."""


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator registering a loss class under ``name``.

    The class should be a (frozen) dataclass whose fields are its parameters; a plain class taking no
    constructor arguments also works (it then has no parameters). Registering a name twice is an error.
    A plug-in's source is captured now (:func:`loss_source`).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"loss name must be a non-empty string, got {name!r}")

    def decorator(cls: type) -> type:
        if not inspect.isclass(cls):
            raise TypeError(f"register_loss({name!r}) decorates a class, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        if cls.__module__ != __name__:
            _SOURCES[cls] = _plugin_source(cls)
        _REGISTRY[name] = cls
        return cls

    return decorator


def _plugin_source(cls: type) -> bytes:
    """The source of the module that defines a plug-in loss (its helpers with it), or where there is
    no source file (a class defined in a notebook or a REPL) the compiled code of its methods."""
    header = f"{cls.__module__}:{cls.__qualname__}\n".encode()
    module = sys.modules.get(cls.__module__)
    try:
        return header + inspect.getsource(module if module is not None else cls).encode()
    except (OSError, TypeError):
        parts = [header]
        for attribute, member in sorted(vars(cls).items()):
            code = getattr(member, "__code__", None)
            if code is not None:
                parts += [attribute.encode(), code.co_code, repr(code.co_consts).encode()]
        return b"\0".join(parts)


def loss_source(name: str) -> bytes | None:
    """What the stage keys of students trained with loss ``name`` hash of its code: for a plug-in,
    the source of the module defining it as it was when it was registered, so that a key describes
    the code this process runs even if the file has changed since; None for a built-in loss (the
    library's own code hash covers those)."""
    cls = _lookup(name)
    if cls.__module__ == __name__:
        return None
    return _SOURCES.get(cls) or _plugin_source(cls)  # put in _REGISTRY by hand: read it now


def load_plugins() -> None:
    """Import the losses of your own, once per process: the modules ``W2S_LOSS_MODULES`` names and
    the ``w2s.losses`` entry points of installed packages. Called by a lookup of a name not
    registered yet, by every listing, and by the API as it starts.

    Raises LossPluginError naming the module or entry point that cannot be loaded and the fix (it
    is tried again on the next lookup)."""
    global _plugins_loaded, _plugins_loading
    if _plugins_loaded or _plugins_loading:
        return
    from w2s.settings import LibrarySettings

    _plugins_loading = True
    try:
        # The environment now, not a cached settings object: a stage's own process loads its
        # plug-ins after taking on its worker's environment.
        for module in LibrarySettings().loss_modules:
            try:
                importlib.import_module(module)
            except Exception as error:
                raise LossPluginError(
                    f"W2S_LOSS_MODULES names {module!r}, which fails to import on this host "
                    f"({type(error).__name__}: {error}); {PLUGIN_HOW_TO}"
                ) from error
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_entry_point(entry)
        _plugins_loaded = True
    finally:
        _plugins_loading = False


def _load_entry_point(entry: importlib.metadata.EntryPoint) -> None:
    package = f" of the package {entry.dist.name}" if entry.dist is not None else ""
    where = f"the {ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value!r}{package}"
    try:
        loaded = entry.load()
    except Exception as error:
        raise LossPluginError(
            f"{where} fails to load ({type(error).__name__}: {error}); reinstall or uninstall that package"
        ) from error
    if inspect.ismodule(loaded):
        return  # imported for its @register_loss decorators
    if not inspect.isclass(loaded):
        raise LossPluginError(f"{where} names a {type(loaded).__name__}, not a loss class or a module")
    if _REGISTRY.get(entry.name) is not loaded:  # its module may have registered it already
        try:
            register_loss(entry.name)(loaded)
        except ValueError as error:
            raise LossPluginError(f"{where}: {error}") from None


def loss_names() -> list[str]:
    """Sorted names of all registered losses, the plug-ins included."""
    load_plugins()
    return sorted(_REGISTRY)


def _lookup(name: str) -> type:
    # The plug-ins load only for a name not registered yet: importing the library (which validates
    # its default loss, xent) loads none, nor does a stage's fork server as it preloads the library.
    if not (isinstance(name, str) and name in _REGISTRY):
        load_plugins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    error = UnknownLoss(
        f"unknown loss {name!r}; choose one of: {', '.join(loss_names())} (a loss of your own: see "
        "'Your own loss' in the README)"
    )
    error.loss = name  # an attribute, not an argument: the error pickles to a stage's parent process
    raise error


def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()


def loss_params(name: str) -> dict[str, Any]:
    """The parameters of loss ``name`` and their defaults (for docs and the CLI)."""
    cls = _lookup(name)
    params: dict[str, Any] = {}
    for f in _fields(cls):
        if f.default is not dataclasses.MISSING:
            params[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            params[f.name] = f.default_factory()
        else:
            params[f.name] = None  # required parameter without a default
    return params


def loss_module(name: str) -> str:
    """The module that defines loss ``name`` (``w2s.losses`` for the built-in ones)."""
    return _lookup(name).__module__


def describe_loss(name: str) -> str:
    """One-line description of loss ``name`` (the first line of its docstring)."""
    doc = inspect.cleandoc(_lookup(name).__doc__ or "")
    return doc.splitlines()[0].strip() if doc else ""


def _check_param_type(loss: str, field: str, hint: Any, value: Any) -> Any:
    """Check (and lightly normalise) one parameter value against its annotated type."""
    if hint is float:
        # bool is an int subclass: reject it explicitly, True is not a coefficient.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"loss {loss!r}: {field} must be a number, got {_short(value)}")
        try:
            number = float(value)
        except OverflowError:  # a 400-digit integer
            raise ValueError(f"loss {loss!r}: {field} is beyond a float's range: {_short(value)}") from None
        if not math.isfinite(number):
            raise ValueError(f"loss {loss!r}: {field} must be finite, got {_short(value)}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"loss {loss!r}: {field} must be an integer, got {_short(value)}")
        if abs(value) >= 2**63:
            raise ValueError(f"loss {loss!r}: {field} is beyond the range of a 64-bit integer")
        return value
    if hint in (bool, str) and not isinstance(value, hint):
        raise ValueError(f"loss {loss!r}: {field} must be a {hint.__name__}, got {value!r}")
    return value  # other annotations: left to the class's own __post_init__ checks


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_loss(name: str, params: Mapping[str, Any] | None = None) -> Loss:
    """Instantiate the loss registered as ``name`` with ``params`` overriding its defaults.

    Raises ValueError for an unknown loss name, an unknown parameter, or a parameter of the wrong type or
    out of range (the message names the offending field).
    """
    cls = _lookup(name)
    params = dict(params or {})
    fields = {f.name: f for f in _fields(cls) if f.init}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "(none)"
        raise ValueError(f"unknown parameter {unknown[0]!r} for loss {name!r}; allowed: {allowed}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations on a custom class: skip the generic type check
        hints = {}
    checked = {key: _check_param_type(name, key, hints.get(key), value) for key, value in params.items()}
    try:
        return cls(**checked)
    except TypeError as exc:  # e.g. a required parameter left out
        raise ValueError(f"loss {name!r}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------


def _require_finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")


def _require_range(field: str, value: float, lo: float, hi: float = math.inf) -> None:
    _require_finite(field, value)
    if not lo <= value <= hi:
        bounds = f"[{lo}, {hi}]" if math.isfinite(hi) else f">= {lo}"
        raise ValueError(f"{field} must be in {bounds}, got {value!r}")


def _prepare(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and upcast to float32. Returns (logits (B, 2), labels (B, 2))."""
    if logits.ndim != 2 or logits.shape[-1] != 2:
        raise ValueError(f"logits must have shape (batch, 2), got {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(
            f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("empty batch")
    return logits.float(), labels.float()


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


@register_loss("xent")
@dataclass(frozen=True)
class XentLoss:
    """Cross entropy against the (soft) labels: mean_i -sum_c labels[i,c] * log softmax(logits)[i,c]."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        logits, labels = _prepare(logits, labels)
        # F.cross_entropy accepts class probabilities as the target: (B, 2) x (B, 2) -> scalar mean.
        return F.cross_entropy(logits, labels)


@register_loss("logconf")
@dataclass(frozen=True)
class LogConfLoss:
    """Auxiliary confidence loss (Burns et al.): mix weak labels with the student's own hardened predictions.

    As openai/weak-to-strong ``logconf_loss_fn``, including its warm-up schedule: the coefficient is
    ``aux_coef * step_frac`` while ``step_frac <= warmup_frac`` and jumps to ``aux_coef`` afterwards (it is
    not ``step_frac / warmup_frac``; reproduced as published).
    """

    aux_coef: float = 0.5
    """Weight of the student's hardened predictions in the target, once warm-up is over (in [0, 1])."""
    warmup_frac: float = 0.1
    """Fraction of training (in [0, 1]) during which the coefficient is ramped up."""

    def __post_init__(self) -> None:
        _require_range("aux_coef", self.aux_coef, 0.0, 1.0)
        _require_range("warmup_frac", self.warmup_frac, 0.0, 1.0)

    def batch_statistics(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> Stats:
        """The hardening threshold: computed over the whole optimizer batch, as the reference does."""
        logits, labels = _prepare(logits, labels)
        preds = torch.softmax(logits.detach(), dim=-1)  # (B, 2)
        # Threshold the student at the quantile that reproduces the weak labels' class balance: if a
        # fraction m of the weak mass is on class 1, the m-quantile of P(class 0) splits the batch so that
        # about m of it is hardened to class 1.
        mean_weak = labels.mean(dim=0)  # (2,)
        return {"threshold": torch.quantile(preds[:, 0], mean_weak[1])}  # scalar

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float, stats: Stats | None = None
    ) -> torch.Tensor:
        if stats is None:  # the tensor given is the whole batch
            stats = self.batch_statistics(logits, labels, step_frac)
        logits, labels = _prepare(logits, labels)
        coef = (1.0 if step_frac > self.warmup_frac else step_frac) * self.aux_coef
        preds = torch.softmax(logits, dim=-1)  # (B, 2)
        threshold = stats["threshold"]
        strong_preds = torch.stack([preds[:, 0] >= threshold, preds[:, 0] < threshold], dim=1)  # (B, 2)
        # Hardened predictions are a target, not a path for gradients.
        target = labels * (1 - coef) + strong_preds.detach().float() * coef  # (B, 2)
        return F.cross_entropy(logits, target)


@register_loss("product")
@dataclass(frozen=True)
class ProductLoss:
    """Cross entropy against the normalised product of student predictions and weak labels.

    As openai/weak-to-strong ``product_loss_fn``: target = preds**beta * labels**alpha, renormalised per
    row and detached. ``warmup_frac`` is accepted for parity with that implementation, which does not use it.
    """

    alpha: float = 1.0
    """Exponent on the weak labels (how much to trust the weak model), >= 0."""
    beta: float = 1.0
    """Exponent on the student's predictions (how much to trust the strong model), >= 0."""
    warmup_frac: float = 0.1
    """Unused (kept for parity with openai/weak-to-strong), in [0, 1]."""

    def __post_init__(self) -> None:
        _require_range("alpha", self.alpha, 0.0)
        _require_range("beta", self.beta, 0.0)
        _require_range("warmup_frac", self.warmup_frac, 0.0, 1.0)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        logits, labels = _prepare(logits, labels)
        preds = torch.softmax(logits, dim=-1)  # (B, 2)
        target = torch.pow(preds, self.beta) * torch.pow(labels, self.alpha)  # (B, 2), unnormalised
        target = target / target.sum(dim=-1, keepdim=True)
        return F.cross_entropy(logits, target.detach())


@register_loss("window")
@dataclass(frozen=True)
class WindowLoss:
    """Cross entropy only on examples where the student is uncertain (max prob < 0.5 + radius).

    As EleutherAI/w2s ``confidence_window_loss``: the per-example losses of the confident examples are
    dropped but the sum is still divided by the full batch size. EleutherAI's ``"midweak"`` radius (median
    weak-label confidence of the train set) needs the data set and is not offered here; a radius above 0.5
    keeps every example (EleutherAI uses 0.51 for that).
    """

    radius: float = 0.15
    """Half-width of the uncertainty window around 0.5, >= 0."""

    def __post_init__(self) -> None:
        _require_range("radius", self.radius, 0.0)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        logits, labels = _prepare(logits, labels)
        preds = torch.softmax(logits, dim=-1)  # (B, 2)
        # The mask is a selection, not something to differentiate through.
        uncertain = (preds.max(dim=-1).values < 0.5 + self.radius).detach()  # (B,) bool
        per_example = F.cross_entropy(logits, labels, reduction="none")  # (B,)
        # Masking (rather than indexing) keeps a graph even when no example is uncertain.
        return (per_example * uncertain.float()).sum() / logits.shape[0]


@register_loss("entropy")
@dataclass(frozen=True)
class EntropyLoss:
    """Like logconf but mixing in the student's soft (unhardened) predictions: an entropy-minimisation term.

    As EleutherAI/w2s ``log_confidence_loss(..., harden=False)`` (dispatched for ``"entropy"`` in
    ``w2s/sft.py``), without its optional batch balancing: target = labels*(1-coef) + preds.detach()*coef,
    with coef = aux_coef * min(1, step_frac / warmup_frac) (a linear ramp; coef = aux_coef when
    warmup_frac = 0). Defaults follow EleutherAI's LogEntropyLossConfig (weight 0.5); its warm-up is in
    steps and is expressed here as a fraction of training.
    """

    aux_coef: float = 0.5
    """Weight of the student's own (detached) predictions in the target after warm-up, in [0, 1]."""
    warmup_frac: float = 0.1
    """Fraction of training (in [0, 1]) over which the coefficient ramps linearly from 0 to aux_coef."""

    def __post_init__(self) -> None:
        _require_range("aux_coef", self.aux_coef, 0.0, 1.0)
        _require_range("warmup_frac", self.warmup_frac, 0.0, 1.0)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        logits, labels = _prepare(logits, labels)
        ramp = min(1.0, step_frac / self.warmup_frac) if self.warmup_frac > 0 else 1.0
        coef = self.aux_coef * ramp
        preds = torch.softmax(logits, dim=-1)  # (B, 2)
        # Cross entropy against a target containing the student's own distribution pulls it towards lower
        # entropy (more confident predictions); detaching keeps the target fixed within the step.
        target = labels * (1 - coef) + preds.detach() * coef  # (B, 2)
        return F.cross_entropy(logits, target)


@register_loss("kl")
@dataclass(frozen=True)
class KLLoss:
    """KL(labels || student): cross entropy minus the labels' entropy, so a perfect fit scores 0.

    As EleutherAI/w2s ``kl_divergence_loss``: ``F.kl_div(log_softmax(logits), labels, "batchmean")``, i.e.
    the forward direction sum_c labels * (log labels - log preds), averaged over the batch (0 * log 0 = 0).
    """

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        logits, labels = _prepare(logits, labels)
        log_preds = F.log_softmax(logits, dim=-1)  # (B, 2)
        # kl_div(input=log q, target=p) = sum p * (log p - log q); "batchmean" divides by B.
        return F.kl_div(log_preds, labels, reduction="batchmean")
