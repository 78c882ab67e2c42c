"""Book-keeping per-example clipping: hooks capture each supported layer's inputs and output gradients
during the ordinary forward and backward pass; after the backward pass (one per micro-batch) the
engine computes every example's whole-model gradient norm from them, the clipping coefficients
c_i = min(1, C / (||g_i|| + 1e-6)), and the clipped sums sum_i c_i g_i. One backward pass, no
per-example gradients for linear and embedding layers unless that is cheaper.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointFunction as _CheckpointFunction

from .. import _mixed
from . import layers

LossReduction = Literal["sum", "mean"]

_ONE_PASS = ("for micro-batches of different examples call optimizer.accumulate() after each micro-batch's "
             "backward(); several losses of the same examples must come from one forward pass and one backward()")

# Layers that treat the examples of a batch independently and whose per-example gradients are small
# enough to instantiate: handled generically through torch.func.
_GENERIC = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
if hasattr(torch.nn, "RMSNorm"):
    _GENERIC = _GENERIC + (torch.nn.RMSNorm,)


# Every module an engine patched or hooked, and each engine's model, to that engine: a model (or a part of one) is
# made private once. Outside the modules, so that copies and pickles of a model carry no entry.
_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
# How many engines are attached: a plain int that torch.compile reads as a constant (and guards), where the weak
# references above cannot be traced.
live_engines = 0


def _engine_gone() -> None:
    global live_engines
    live_engines -= 1


def attached_engine(module: torch.nn.Module) -> ClippingEngine | None:
    """The live engine that captures ``module``'s forward passes, if any."""
    ref = _ATTACHED.get(module)
    return None if ref is None else ref()


def head_engine(weight: torch.Tensor) -> tuple[ClippingEngine, str] | None:
    """The live engine and layer name of the linear layer whose weight is ``weight``, if one holds it (for
    dpkd.fused_linear_distill_loss, which multiplies the weight outside the layer)."""
    for engine in _engines():
        if id(weight) in engine.linear_weights:
            return engine, engine.linear_weights[id(weight)]
    return None


def _engines() -> list[ClippingEngine]:
    return [e for e in {ref() for ref in list(_ATTACHED.values())} if e is not None]


@torch.compiler.disable(reason="reads the live engines (weak references)")
def any_attached() -> bool:
    """Whether any model is private now."""
    return bool(_engines())


def depends_on_private(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s autograd graph passes through a layer whose per-example gradients an engine captures, or
    reads a parameter an engine clips: a loss on it is clipped per example (and must treat the examples apart)."""
    return bool(private_engines(tensor))


def private_engines(tensor: torch.Tensor) -> set[ClippingEngine]:
    """The live engines whose layers or parameters ``tensor``'s autograd graph passes through. A reentrant checkpoint
    hides the parameters its segment used: meeting one, every engine counts, and so does meeting a captured layer
    whose parameters the graph does not show."""
    engines = _engines()
    if not engines:
        return set()
    # Generic layers' forwards read stand-ins of their parameters (ClippingEngine._stand_in_params): new leaves on
    # the same storage, known by their data pointers.
    owner = {p.data_ptr(): e for e in engines for p in e.params}
    found, captured = set(), False
    todo, seen = [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = getattr(node, "_forward_cls", None)
        if kind is _CheckpointFunction:
            return set(engines)
        captured |= kind in (_CapturingLinear, _CapturingEmbedding)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if isinstance(variable, torch.Tensor) and variable.data_ptr() in owner:
            found.add(owner[variable.data_ptr()])
        todo.extend(fn for fn, _ in node.next_functions)
    return set(engines) if captured and not found else found


def _tensor_leaves(value, depth: int = 0):
    """Tensors of at least one dimension in ``value``, and inside its dicts, lists and tuples, in order."""
    if isinstance(value, torch.Tensor):
        if value.dim():
            yield value
    elif depth < 4 and isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensor_leaves(item, depth + 1)


def _model_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A model's input, whose first dimension is the batch: its first tensor argument, taken from its positional
    arguments, then a Hugging Face model's input_ids or inputs_embeds, then its other keyword arguments in order (and
    inside dicts and lists). None where the call holds no tensor."""
    ordered = (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"),
               *(v for k, v in kwargs.items() if k not in ("input_ids", "inputs_embeds")))
    return next(_tensor_leaves(ordered), None)


# An entry into the model whose input holds no tensor: its layers' rows cannot be checked against the batch.
_NO_INPUT = -1


def _inert_hook(*args) -> None:
    return None


class _EngineHook:
    """A module hook that calls one of the engine's methods while the engine lives. A copy or a pickle of the
    model gets an inert hook instead: the copy is not private, and the engine cannot be pickled."""

    def __init__(self, engine: ClippingEngine, method: str, *bound) -> None:
        self.engine, self.method, self.bound = weakref.ref(engine), method, bound

    def __call__(self, *args):
        engine = self.engine()
        return None if engine is None else getattr(engine, self.method)(*self.bound, *args)

    def __reduce__(self):
        return (_make_inert_hook, ())


def _make_inert_hook():
    return _inert_hook


def _prefixes(name: str) -> list[str]:
    """'' and every dotted prefix of a module name: the modules that hold it."""
    parts = name.split(".")
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts))]


def _scaled_embedding(module: torch.nn.Embedding) -> bool:
    """Whether an nn.Embedding subclass with a forward of its own computes embedding(ids) * module.embed_scale
    (Gemma's scaled word embeddings), checked on a probe: the capturing forward then multiplies the scale in."""
    scale = getattr(module, "embed_scale", None)
    if scale is None or module.num_embeddings == 0:
        return False
    ids = torch.arange(min(2, module.num_embeddings), device=module.weight.device).reshape(1, -1)
    try:
        with torch.no_grad():
            out = type(module).forward(module, ids)
            want = F.embedding(ids, module.weight, module.padding_idx) * torch.as_tensor(scale).to(module.weight.dtype)
    except (TypeError, RuntimeError):
        return False
    return isinstance(out, torch.Tensor) and out.shape == want.shape and torch.equal(out, want)


def _plain_linear(module: torch.nn.Linear) -> bool:
    """Whether a Linear subclass's own forward computes F.linear (Falcon's does, by hand), checked on a probe."""
    w = module.weight
    probe = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    tol = 1e-2 if w.dtype in (torch.bfloat16, torch.float16) else 1e-5
    try:
        with torch.no_grad():
            out = type(module).forward(module, probe)
            want = F.linear(probe, w, module.bias)
            return (isinstance(out, torch.Tensor) and out.shape == want.shape
                    and bool(torch.allclose(out.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))))
    except (TypeError, RuntimeError, NotImplementedError):  # another signature; a device without values (meta)
        return False


def layer_kind(module: torch.nn.Module) -> str | None:
    """'linear', 'conv1d_hf' (GPT-2's transposed linear), 'embedding', 'generic' or None (unsupported). A Linear or
    Embedding subclass whose forward does something else (OPT's learned positions, a linear that rescales) is
    unsupported: the capturing forward would replace it. Checked on a probe, two such forwards are taken: a linear's
    that computes F.linear, and Gemma's scaled embedding. One whose trainable parameters are not its weight and bias
    is generic (torch.func runs its forward): the old torch.nn.utils.weight_norm / spectral_norm compute ``weight``
    from other parameters (weight_g and weight_v, weight_orig), which the captured weight's clipped sum would miss."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or type(module).__name__ == "Conv1D":
        if not {n for n, p in module.named_parameters(recurse=False) if p.requires_grad} <= {"weight", "bias"}:
            return "generic"
    if isinstance(module, torch.nn.Linear):
        return "linear" if type(module).forward is torch.nn.Linear.forward or _plain_linear(module) else None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d_hf"
    if isinstance(module, torch.nn.Embedding):
        plain = not (module.sparse or module.max_norm is not None or module.scale_grad_by_freq)
        own_forward = type(module).forward is not torch.nn.Embedding.forward
        return "embedding" if plain and (not own_forward or _scaled_embedding(module)) else None
    if isinstance(module, _GENERIC) or type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
        return "generic"
    return None


def _summed(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of [B] tensors in one op where they share a dtype (a step sums one per layer)."""
    if len(parts) <= 1 or any(p.dtype != parts[0].dtype for p in parts):
        return sum(parts[1:], parts[0]) if parts else None
    return torch.stack(parts).sum(0)


def _trainable_bias(module: torch.nn.Module) -> bool:
    return getattr(module, "bias", None) is not None and module.bias.requires_grad


@dataclasses.dataclass
class _Call:
    """One forward call of a layer: its inputs, then its output gradient, or, for a linear layer whose
    per-example gradients are cheaper than its ghost norm, those gradients (and the bias's) instead of both.
    Until its gradient arrives only the autograd graph holds it (a forward that never reaches backward frees its
    captures with its graph); then the engine does, until the step or accumulate() consumes it."""
    inputs: tuple
    entry: int | None = 0  # which outermost entry into the model made it; None: recomputed inside backward
    grad: torch.Tensor | None = None
    rows: int = 0
    per_example: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
    rows_per_example: int = 1  # the engine's grouping when per_example was formed
    on_grad: typing.Callable[[_Call, torch.Tensor], None] | None = None
    autocast: torch.dtype | None = None  # generic layers: the forward's autocast dtype, for torch.func's re-forward
    versions: tuple[int, ...] = ()  # the inputs' versions when the layer read them
    dims: int = 0  # the first input's dimensions

    def __post_init__(self) -> None:
        self.versions = tuple(t._version for t in self.inputs if isinstance(t, torch.Tensor))
        self.dims = self.inputs[0].dim() if self.inputs and isinstance(self.inputs[0], torch.Tensor) else 0

    def check_unchanged(self, name: str) -> None:
        """The captured inputs are those the layer read: an in-place change since (which autograd would refuse for a
        tensor it saved) would give the per-example gradients of other values."""
        if not self.inputs:  # released, or consumed when the gradient arrived (instantiated per-example gradients)
            return
        now = tuple(t._version for t in self.inputs if isinstance(t, torch.Tensor))
        if now != self.versions:
            raise ValueError(f"the input of layer {name!r} was modified in place after the layer read it (the model's "
                             "ids or activations): its per-example gradients are formed from that input at the step")

    @property
    def done(self) -> bool:
        return self.rows > 0


class _CapturingLinear(torch.autograd.Function):
    """y = x W^T + b on 2-D x ([tokens, d]; the caller views y back to x's leading shape) whose backward records
    dL/dy, in that shape (``lead``), and computes dL/dx only: the weight gradient is the engine's clipped sum, so
    autograd never spends a GEMM on the non-private one. ``anchor`` (a scalar that requires grad) keeps y in the
    graph even when neither x nor W needs a gradient. 2-D, because F.linear of a 3-D x with a bias returns a
    view, and autograd refuses in-place changes (an inplace ReLU after the layer) to a view made inside a custom
    Function; a view taken outside it is an ordinary one."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, call, lead):
        ctx.save_for_backward(weight)
        ctx.call, ctx.lead = call, lead
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        ctx.call.on_grad(ctx.call, g.detach().reshape(*ctx.lead, g.shape[-1]))
        (weight,) = ctx.saved_tensors
        gx = g @ weight.to(g.dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None


class _CapturingEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, anchor, call):
        ctx.call = call
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, g):
        ctx.call.on_grad(ctx.call, g.detach())
        return None, None, None, None, None


class ClippingEngine:
    """Hooks on every module that owns trainable parameters of ``model``; see the module docstring."""

    def __init__(self, model: torch.nn.Module, loss_reduction: LossReduction = "sum") -> None:
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.layers: dict[str, tuple[torch.nn.Module, str]] = {}
        unsupported, owners = [], {}
        for name, module in model.named_modules():
            own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            kind = layer_kind(module)
            if kind is None:
                unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
                continue
            self.layers[name] = (module, kind)
            for pn, p in own:
                owners.setdefault(id(p), []).append((name, pn, p))
        if unsupported:
            raise ValueError("DP-SGD cannot compute per-example gradients for these trainable modules: "
                             + ", ".join(unsupported) + ". Freeze them (requires_grad=False) or replace them.")
        if not self.layers:
            raise ValueError("model has no trainable parameters")
        self.params = [entries[0][2] for entries in owners.values()]
        # Tied weights: only an embedding shared with a linear output head (the usual LM tying).
        self.tied: list[tuple[str, str]] = []
        for entries in owners.values():
            if len(entries) == 1:
                continue
            kinds = sorted((self.layers[n][1], n) for n, _, _ in entries)
            if len(entries) == 2 and [k for k, _ in kinds] == ["embedding", "linear"]:
                self.tied.append((kinds[0][1], kinds[1][1]))
            else:
                raise ValueError("parameter shared by " + ", ".join(n for n, _, _ in entries)
                                 + ": only an embedding tied to a linear head is supported")
        self.calls: dict[str, list[_Call]] = {name: [] for name in self.layers}  # calls whose gradient arrived
        # Linear layers' weights as dpkd.fused_linear_distill_loss finds them, and its uses of them (privacy.head)
        self.linear_weights = {id(m.weight): name for name, (m, kind) in self.layers.items() if kind == "linear"}
        self.head_calls: dict[str, list[typing.Any]] = {name: [] for name in self.linear_weights.values()}
        self.instantiate: dict[str, bool] = {}  # linear layers: per-example gradients (True) or ghost norms
        self.closed_form_ok: dict[str, bool] = {}  # norm layers whose closed form was checked against torch.func
        # Rows per privacy unit: k consecutive batch rows (e.g. a prompt's k sampled continuations)
        # form one example, whose gradient is the sum over its rows.
        self.rows_per_example = 1
        self.anchor = torch.zeros((), requires_grad=True)
        # id(x) -> (weak reference to x, x's version, autocast's copy of x): see _as_multiplied
        self._autocast_copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        # A backward pass has delivered output gradients that no step or accumulate() has consumed yet: a forward
        # pass now (outside a backward pass) would add another batch's rows to the same examples (_call_entry).
        self._backward_seen = False
        self._flushing = False  # flush() runs modules through torch.func: its forwards are not the model's
        # Outermost entries into the model (its root, the modules holding captured layers, or a captured layer
        # called alone), counted by hooks: a layer whose delivered calls come from two entries met two passes.
        self._depth, self._entry, self._entries_since_clear = 0, 0, 0
        # Each entry's input batch size (its rows), which the layers' rows must equal: a model that folds tokens into
        # the batch dimension (OPT's decoder layers reshape to [B * T, d]) would otherwise be clipped per token.
        self._entry_rows: dict[int, int | None] = {}
        # ... and the dimensions an embedding's ids must have: 2 ([B, ...]) where the input has them. Ids without the
        # batch dimension (nanoGPT's wpe(torch.arange(T)), a ViT's positions) are shared by the examples, and pass
        # the rows check where B = T.
        self._entry_id_dims: dict[int, int | None] = {}
        # The latest ids of each embedding tied to a head: a fused loss on that head gathers its logit gradients at
        # those ids for the cross term of the two uses (privacy.head)
        self._tied_ids: dict[str, torch.Tensor] = {}
        # Batch norms that normalise with the batch's statistics (training mode, or no running statistics) mix
        # the examples (checked at wrap and flush).
        # Instance norms that track running statistics update them from each batch in training mode: buffers
        # outside the clipping and the noise, released with the model (checked alike).
        norm_kinds = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)
        self.norms = [(n, m) for n, m in model.named_modules() if isinstance(m, norm_kinds)]
        self.check_norms()
        # Parameters frozen now: unfrozen later, their gradients would be neither captured nor clipped (checked at
        # flush), and autograd would leave them raw in .grad (an audit found that of modules frozen altogether).
        self.frozen_params = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        self.model = weakref.ref(model)
        self._storages: set[int] | None = None  # the model's parameters' and buffers' storages, once per entry
        holders = {prefix for name in self.layers for prefix in _prefixes(name)}
        self.handles = []
        for name, module in model.named_modules():
            if name in holders:
                self.handles.append(module.register_forward_pre_hook(_EngineHook(self, "_enter", module),
                                                                     with_kwargs=True))
                self.handles.append(module.register_forward_hook(_EngineHook(self, "_leave", module), always_call=True))
        self.patched: list[torch.nn.Module] = []
        _ATTACHED[model] = weakref.ref(self)
        global live_engines
        live_engines += 1
        self._gone = weakref.finalize(self, _engine_gone)
        for name, (module, kind) in self.layers.items():
            _ATTACHED[module] = weakref.ref(self)
            if kind == "generic":
                # First of the pre-hooks: one registered earlier (the old weight_norm's) may read the parameters.
                self.handles.append(module.register_forward_pre_hook(
                    _EngineHook(self, "_stand_in_params", name, module), prepend=True))
                self.handles.append(module.register_forward_hook(_EngineHook(self, "_capture_generic", name, module)))
                self.handles.append(module.register_forward_hook(_EngineHook(self, "_restore_params", module),
                                                                 always_call=True))
            else:  # linear, GPT-2 Conv1D, embedding: forward through a capturing autograd function
                module.forward = types.MethodType(self._capturing_forward(name, kind, module), module)
                self.patched.append(module)
        # Autograd never writes these parameters' .grad (the capturing functions give none, and the generic layers'
        # forwards read stand-ins): if it does, they were used outside their module.
        # The trainable parameters each layer holds now: a layer that reads another tensor in their place at a call
        # (torch.func.functional_call, an assignment) is refused, since its per-example gradients would not reach them.
        self._own_params = {name: {pn: p for pn, p in module._parameters.items() if p is not None and p.requires_grad}
                            for name, (module, _) in self.layers.items()}
        self.patched_params = [(f"{m_name}.{pn}", p) for m_name, own in self._own_params.items()
                               for pn, p in own.items()]
        # Each gradient autograd brings them is recorded, whatever its value (a zero one too) and whatever the user
        # did to .grad (a hook on the tensor: it sees the gradient before accumulation, None where a capturing
        # function gave none).
        self.outside_uses: list[str] = []
        for n, p in self.patched_params:
            self.handles.append(p.register_hook(_EngineHook(self, "_outside_use", n)))
        self._stood_in: dict[torch.nn.Module, list[dict[str, torch.nn.Parameter]]] = {}

    def _outside_use(self, name: str, grad: torch.Tensor | None) -> None:
        if grad is not None:
            self.outside_uses.append(name)

    def _enter(self, target: torch.nn.Module, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not target:  # a copy's hook
            return
        if self._depth == 0 and self._new_entry():
            x = _model_input(args, kwargs)  # earlier entries are consumed or refused
            self._entry_rows = {self._entry: _NO_INPUT if x is None else x.shape[0]}
            self._entry_id_dims = {self._entry: None if x is None else min(x.dim(), 2)}
            self._storages = None
        self._depth += 1

    def _leave(self, target: torch.nn.Module, module: torch.nn.Module, args: tuple, output) -> None:
        if module is target:
            self._depth -= 1

    def _new_entry(self) -> bool:
        if torch.is_grad_enabled() and not self._in_backward():
            self._entry += 1
            self._entries_since_clear += 1
            return True
        return False

    def _call_entry(self) -> int | None:
        """The entry a capture belongs to: None inside backward (a reentrant checkpoint's recomputation), else the
        current outermost entry, or a new one for a captured layer called on its own. Outside backward, a capture
        after a backward pass whose gradients no step has consumed is refused: its rows would join the earlier
        batch's examples of the same index in one clipping unit."""
        if self._in_backward():
            return None
        if self._backward_seen:
            raise RuntimeError("a forward pass began after backward() and before optimizer.step() (or after a step that "
                               "raised: optimizer.zero_grad() drops that batch): " + _ONE_PASS)
        if self._depth == 0:
            self._new_entry()
        return self._entry

    def head_entry(self) -> int | None:
        """The entry of a head's use inside dpkd.fused_linear_distill_loss: that of the latest pass into the model,
        whose hidden states it reads (the loss is called outside the model); refused like a forward pass after a
        backward pass that no step has consumed."""
        if self._backward_seen:
            raise RuntimeError("dpkd.fused_linear_distill_loss was called after backward() and before "
                               "optimizer.step(): " + _ONE_PASS)
        return self._entry

    def tied_ids(self, head: str) -> tuple[str, torch.Tensor] | None:
        """For a head tied to an embedding: (the embedding's name, the ids of its latest call with gradients), which a
        fused loss on the head needs for the cross term; None for an untied head."""
        emb = next((e for e, h in self.tied if h == head), None)
        if emb is None or not self.layers[emb][0].weight.requires_grad:
            return None
        # The embedding's latest ids (None: it never ran with gradients, e.g. inputs_embeds made under no_grad): the
        # step checks them against the ids of the calls that delivered gradients, and refuses two passes through it.
        ids = self._tied_ids.get(emb)
        return None if ids is None else (emb, ids)

    def receive_head(self, name: str, head) -> None:
        """A head's use inside the fused loss, delivered by the loss's backward pass (privacy.head.PrivateHead)."""
        if self.head_calls[name]:
            raise RuntimeError(f"layer {name!r} reached dpkd.fused_linear_distill_loss's backward twice before one "
                               "step (two fused losses on one head, or a second backward pass through one): the "
                               "cross terms of the two uses' per-example gradients are not formed; add the losses' "
                               "token weights into one call")
        self.head_calls[name].append(head)
        self._backward_seen = True

    def check_norms(self) -> None:
        batch = [f"{n or '<root>'} ({type(m).__name__})" for n, m in self.norms
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)]
        if batch:
            raise ValueError("batch norm in training mode (or without running statistics) normalises each example "
                             "with statistics of the whole batch, so one example changes the others' gradients, "
                             "which per-example clipping cannot bound: " + ", ".join(batch) + ". Put them in eval "
                             "mode with running statistics after model.train(), or use GroupNorm/LayerNorm")
        tracking = [f"{n or '<root>'} ({type(m).__name__})" for n, m in self.norms
                    if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.training
                    and m.track_running_stats]
        if tracking:
            raise ValueError("instance norm with track_running_stats=True updates its running statistics from the "
                             "private batch in training mode, without clipping or noise, and they are released with "
                             "the model: " + ", ".join(tracking) + ". Use track_running_stats=False, or eval mode")

    def check_frozen_params(self) -> None:
        unfrozen = [n for n, p in self.frozen_params if p.requires_grad]
        if unfrozen:
            raise ValueError(f"parameters frozen at make_private are trainable now ({', '.join(unfrozen)}): their "
                             "per-example gradients are not captured, so they cannot be clipped; unfreeze "
                             "parameters before make_private")

    @staticmethod
    def _in_backward() -> bool:
        task = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass
        return task is not None and task() != -1

    def _capturing_forward(self, name: str, kind: str, target: torch.nn.Module):
        receive = self._keep_grad(name) if kind == "embedding" else self._linear_grad(name)
        tied = kind == "embedding" and any(emb == name for emb, _ in self.tied)
        # Gemma's scaled embedding (layer_kind checked its forward): the scale goes on after the capture, whose output
        # gradient then carries it, as the weight's gradient does
        scaled = kind == "embedding" and type(target).forward is not torch.nn.Embedding.forward
        anchor, target = self.anchor, weakref.ref(target)

        def forward(module, x):
            if module is not target():  # a copy of the patched module (copy.deepcopy): not private
                return type(module).forward(module, x)
            if not (torch.is_grad_enabled() and (module.weight.requires_grad or _trainable_bias(module))):
                # generation, evaluation, or a layer frozen since make_private: the plain layer
                return type(module).forward(module, x)
            self._check_own_params(name, module)
            self._check_batched(name, x)
            if kind == "conv1d_hf":
                weight, bias = module.weight.t(), module.bias
            else:
                weight, bias = module.weight, getattr(module, "bias", None)
            entry = self._call_entry()
            if kind != "embedding":
                x = self._as_multiplied(x)
            call = _Call((x.detach(),), entry, on_grad=receive)
            if tied:
                self._tied_ids[name] = x.detach()
            if kind == "embedding":
                out = _CapturingEmbedding.apply(x, weight, module.padding_idx, anchor, call)
                return out * torch.as_tensor(module.embed_scale).to(weight.dtype) if scaled else out
            lead = tuple(x.shape[:-1])
            y = _CapturingLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, anchor, call, lead)
            return y.view(*lead, y.shape[-1])
        return forward

    def _as_multiplied(self, x: torch.Tensor) -> torch.Tensor:
        """x as a linear layer multiplies it: under autocast, its copy in autocast's dtype. Captured instead of x,
        it gives the per-example gradients of the computation that ran, in 16 bits (half the memory of an fp32 x,
        16-bit matmuls for the norms and clipped sums); layers that read one tensor (q, k, v) share one copy, as
        their ghost norms share its Gram. The copy is made once per tensor, version and dtype; the cache does not
        keep x alive, forgets the copy when x dies, and is emptied when the clipping begins (the captures hold the
        copies, released layer by layer)."""
        device = x.device.type
        if not (x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(device)):
            return x
        dtype = torch.get_autocast_dtype(device)
        if x.dtype == dtype:
            return x
        copies, key = self._autocast_copies, id(x)
        hit = copies.get(key)
        if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2].dtype == dtype:
            return hit[2]

        def forget(ref: weakref.ref) -> None:  # x is gone: no layer can read it again
            if copies.get(key, (None,))[0] is ref:
                del copies[key]

        copy = x.to(dtype)
        copies[key] = (weakref.ref(x, forget), x._version, copy)
        return copy

    def _check_batched(self, name: str, x) -> None:
        """Refuse a layer input that is the model's own parameter or buffer (or a view of it) without an expanded
        batch dimension: a [T, d] table shared by all examples, whose rows pass the row check where B = T and would
        each be clipped as an example."""
        if not isinstance(x, torch.Tensor) or (x.dim() and x.stride(0) == 0):
            return
        if self._storages is None:
            model = self.model()
            tensors = [] if model is None else [*model.parameters(), *model.buffers()]
            self._storages = {t.untyped_storage().data_ptr() for t in tensors} - {0}
        if x.untyped_storage().data_ptr() in self._storages:  # 0 (empty or meta tensors) never is
            raise ValueError(f"layer {name!r} was applied to a parameter or buffer of the model, a tensor without the "
                             "batch dimension shared by all examples: its rows are not examples (where B equals "
                             "their number they would pass for them); apply it to table.expand(B, *table.shape), "
                             "or freeze it")

    def _check_own_params(self, name: str, module: torch.nn.Module) -> None:
        for pn, p in self._own_params[name].items():
            if module._parameters.get(pn) is not p:
                raise ValueError(f"layer {name!r} reads another tensor as its {pn} than the parameter it held at "
                                 "make_private (torch.func.functional_call or an assignment replaced it): its "
                                 "per-example gradients would not reach the parameter")

    def _stand_in_params(self, name: str, target: torch.nn.Module, module: torch.nn.Module, args: tuple) -> None:
        """During a generic layer's forward its trainable parameters are stand-ins (new leaves on the same storage):
        its own uses then give the real parameters no autograd gradient (the engine forms theirs from the captures),
        so a gradient on a real one comes from a use outside the module, which per-example clipping cannot see."""
        if module is not target or self._flushing or not torch.is_grad_enabled():
            self._stood_in.setdefault(module, []).append({})
            return
        self._check_own_params(name, module)
        real = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
        for n, p in real.items():
            module._parameters[n] = torch.nn.Parameter(p.detach(), requires_grad=True)
        self._stood_in.setdefault(module, []).append(real)

    def _restore_params(self, target: torch.nn.Module, module: torch.nn.Module, args: tuple, output) -> None:
        stack = self._stood_in.get(module)
        if stack:
            module._parameters.update(stack.pop())

    def _capture_generic(self, name: str, target: torch.nn.Module, module: torch.nn.Module, args: tuple,
                         output) -> None:
        """Forward hook of a layer whose per-example gradients come from torch.func or a closed form."""
        if module is not target or self._flushing or not (
                torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return  # the engine's own torch.func calls, evaluation, or a frozen path
        self._check_batched(name, args[0] if args else None)
        call = _Call(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), self._call_entry(),
                     autocast=_mixed.autocast_dtype(output.device.type))
        keep = self._keep_grad(name)
        output.register_hook(lambda g: keep(call, g.detach()))

    @staticmethod
    def _once(name: str, call: _Call) -> None:
        # A second backward pass through the same forward (retain_graph=True) would need its gradient added
        # to the first before anything is formed from it; refused rather than half supported.
        if call.done:
            raise RuntimeError(f"a second backward pass reached layer {name!r} through the same forward call "
                               "before optimizer.step(): DP-SGD here takes one backward pass per forward pass "
                               "-- add the per-example losses and call backward() once")

    def _keep_grad(self, name: str):
        def keep(call: _Call, g: torch.Tensor) -> None:
            self._once(name, call)
            call.check_unchanged(name)
            call.grad, call.rows = g, g.shape[0]
            self._received(name, call)
        return keep

    def _linear_grad(self, name: str):
        """Output-gradient receiver of a linear layer. Where instantiating is cheaper than the ghost norm
        (2 T^2 >= d p, decided at the layer's first call of a batch), the per-example gradients G_i^T A_i are
        formed right away and the layer's inputs and output gradients dropped: they are no smaller than the
        per-example gradients then, and the clipped sum becomes a weighted sum of them instead of a matmul."""
        module, _ = self.layers[name]
        tied_head = any(head == name for _, head in self.tied)  # its cross term with the embedding needs A, G
        keep = self._keep_grad(name)

        def receive(call: _Call, g: torch.Tensor) -> None:
            self._once(name, call)
            call.check_unchanged(name)
            a = layers.flatten_tokens(call.inputs[0])
            g3 = layers.flatten_tokens(g)
            if name not in self.instantiate:
                self.instantiate[name] = not tied_head and not layers.use_ghost(
                    g3.shape[1] * self.rows_per_example, a.shape[-1], g3.shape[-1])
            if not self.instantiate[name] or g3.shape[0] % self.rows_per_example:  # flush names the bad shape
                keep(call, g)
                return
            a, g3 = self._group(a), self._group(g3)
            with _mixed.no_autocast([g3.device.type]):  # a backward pass run inside autocast
                call.per_example = layers.linear_per_example_grads(a, g3, weight=module.weight.requires_grad,
                                                                   bias=_trainable_bias(module))
            call.inputs, call.rows, call.rows_per_example = (), g.shape[0], self.rows_per_example
            self._received(name, call)
        return receive

    def _received(self, name: str, call: _Call) -> None:
        self.calls[name].append(call)
        self._backward_seen = True

    def _checked_closed_form(self, name: str, module: torch.nn.Module, params: dict, inputs: tuple,
                             g: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """A Hugging Face-style RMSNorm's closed-form per-example gradients, compared once per module with
        torch.func's (the class name does not prove the formula); a module that disagrees takes the torch.func
        path from then on."""
        if self.closed_form_ok.get(name) is False:
            return None
        per = layers.hf_rmsnorm_per_example_grads(module, inputs[0], g, set(params))
        if per is None or name in self.closed_form_ok:
            return per
        ref = layers.per_example_grads(module, params, inputs, g)
        scales = {n: float(ref[n].norm()) for n in ref}
        if not all(0 < v < float("inf") for v in scales.values()):
            return ref  # a zero or non-finite gradient proves nothing: check again at the next call
        tol = 5e-2 if inputs[0].dtype in (torch.bfloat16, torch.float16) else 1e-4
        self.closed_form_ok[name] = all(float((per[n] - ref[n]).norm()) <= tol * scales[n] for n in ref)
        return per if self.closed_form_ok[name] else ref

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for module, stack in self._stood_in.items():  # a forward still running (remove() called inside it)
            for real in reversed(stack):
                module._parameters.update(real)
        self._stood_in.clear()
        for module in self.patched:
            del module.forward  # back to the class's forward
        self.handles, self.patched = [], []
        for module in [m for m, ref in _ATTACHED.items() if ref() is self]:
            del _ATTACHED[module]
        if self._gone.detach():
            _engine_gone()

    def _release(self, name: str) -> None:
        # The autograd graph (alive while the loss is) still refers to the calls: empty them, not just the list.
        for c in self.calls[name]:
            c.inputs, c.grad, c.per_example = (), None, None
        self.calls[name].clear()
        for h in self.head_calls.get(name, ()):
            h.release()
        self.head_calls.get(name, []).clear()

    def clear(self) -> None:
        """Drop what backward passes delivered. Forward passes still waiting for their backward keep their captures
        (zero_grad() between a forward and its backward; a micro-batch's forward before the previous one's
        accumulate()): their graphs hold them."""
        for name in self.calls:
            self._release(name)
        self.instantiate.clear()
        self._autocast_copies.clear()
        self._entry_rows = {}  # a forward still waiting for its backward goes unchecked rather than held to a stale size
        self._entry_id_dims = {}
        self._backward_seen = False
        self._entries_since_clear = 0
        self.outside_uses = []

    @property
    def pending(self) -> bool:
        return any(c.done for calls in self.calls.values() for c in calls) or any(self.head_calls.values())

    def _batch_size(self) -> int:
        """Examples in the captured batch (rows / rows_per_example)."""
        entries_of: dict[str, set[int | None]] = {}
        for name, calls in self.calls.items():
            heads = self.head_calls.get(name, [])
            if heads and any(c.done for c in calls):
                raise ValueError(f"layer {name!r} was used both through its forward and by "
                                 "dpkd.fused_linear_distill_loss before one step: the cross terms of the two uses' "
                                 "per-example gradients are not formed")
            entries = entries_of[name] = {c.entry for c in calls if c.done} | {h.entry for h in heads}
            # Row i of each pass would be one clipping unit: two examples, if the passes held different ones. (A
            # layer called twice within one pass -- a shared layer -- is one entry.)
            if len(entries - {None}) > 1:
                raise ValueError(f"layer {name!r} met several forward passes of the model before one step: "
                                 + _ONE_PASS)
            if None in entries and self._entries_since_clear > 1:
                raise ValueError(f"layer {name!r} was recomputed by reentrant gradient checkpointing after several "
                                 "forward passes: which pass each recomputation belongs to cannot be told; run one "
                                 "forward pass per backward, or checkpoint with use_reentrant=False")
        seen: dict[int, list[str]] = {}  # rows -> the layers that saw them
        for name in self.calls:
            for rows in {c.rows for c in self.calls[name] if c.done} | {h.rows for h in self.head_calls.get(name, ())}:
                seen.setdefault(rows, []).append(name)
        if len(seen) != 1:
            parts = "; ".join(f"{rows} rows: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                              for rows, names in sorted(seen.items()))
            raise ValueError(f"layers saw different batch sizes ({parts}): the batch dimension must be first "
                             "everywhere (pass Hugging Face models position_ids of shape [B, T], not [1, T]; a model "
                             "that folds tokens into the batch dimension, as OPT's decoder layers do, cannot be "
                             "clipped per example there), and the loss must be per example")
        rows = next(iter(seen))
        for name, entries in entries_of.items():
            inputs = {self._entry_rows.get(e) for e in entries} - {None}
            if _NO_INPUT in inputs:
                raise ValueError(f"layer {name!r} ran in a call of the model without a tensor argument: the batch size "
                                 "its rows must equal is unknown (a model that folds tokens into the batch dimension "
                                 "would be clipped per token unnoticed); pass the model its input as a tensor, a "
                                 "keyword argument, or inside a dict or list")
            if inputs and inputs != {rows}:
                raise ValueError(f"layer {name!r} saw {rows} rows where the model's input had {inputs.pop()}: the "
                                 "model folds something (OPT's decoder layers: the tokens) into the batch dimension "
                                 "before it, so clipping would bound each row, not each example")
            if self.layers[name][1] == "embedding":
                for c in self.calls[name]:
                    want = self._entry_id_dims.get(c.entry)
                    if c.done and want is not None and c.dims < want:
                        raise ValueError(f"embedding {name!r} read ids of {c.dims} dimension(s) where the model's input "
                                         f"has {want} or more: ids without the batch dimension (such as positions "
                                         "torch.arange(T)) are shared by all examples, so their rows are not "
                                         "examples; pass ids batch first with 2 dimensions, e.g. "
                                         "torch.arange(T).expand(B, T), or ids[:, None] for one id per example")
        if any(c.per_example is not None and c.rows_per_example != self.rows_per_example
               for calls in self.calls.values() for c in calls) or any(
                h.rows_per_example != self.rows_per_example for heads in self.head_calls.values() for h in heads):
            raise ValueError("rows_per_example changed between the backward pass and the step")
        if rows % self.rows_per_example:
            raise ValueError(f"{rows} batch rows do not split into examples of {self.rows_per_example} rows")
        return rows // self.rows_per_example

    def _group(self, x: torch.Tensor) -> torch.Tensor:
        """[R, T, f] -> [R / k, k T, f]: an example's rows become extra tokens of that example."""
        k = self.rows_per_example
        return x if k == 1 else x.reshape(x.shape[0] // k, k * x.shape[1], *x.shape[2:])

    def _tokens(self, name: str):
        """(inputs, output grads) of every call of a layer, calls concatenated as extra tokens (a layer called
        once is used as captured, without a copy); output grads not yet scaled by the loss reduction. For an
        instantiated linear layer: ("per_example", weight, bias), summed over its calls."""
        module, kind = self.layers[name]
        done = [c for c in self.calls[name] if c.done]
        if not done:
            return None
        for c in done:
            c.check_unchanged(name)
        if kind not in ("embedding", "linear", "conv1d_hf"):
            return done
        if self.instantiate.get(name):
            parts = zip(*(c.per_example for c in done))
            return ("per_example", *(None if p[0] is None else sum(p[1:], p[0]) for p in parts))

        def tokens(xs):
            return self._group(xs[0] if len(xs) == 1 else torch.cat(xs, 1))

        g = tokens([layers.flatten_tokens(c.grad) for c in done])
        if kind == "embedding":
            return tokens([c.inputs[0].reshape(c.inputs[0].shape[0], -1, 1) for c in done])[..., 0], g
        return tokens([layers.flatten_tokens(c.inputs[0]) for c in done]), g

    def flush(self, max_grad_norm: float, sums: dict[int, torch.Tensor]) -> torch.Tensor:
        """Clip this micro-batch: add sum_i c_i g_i into ``sums`` (keyed by id(param)); returns ||g_i||."""
        self._autocast_copies.clear()
        self.check_norms()
        self.check_frozen_params()
        self._flushing = True
        mine: dict[int, torch.Tensor] = {}
        try:
            # Inside autocast a step would form the sums from bf16 products, rounded otherwise than the norms, and an
            # example's contribution could pass C.
            with _mixed.no_autocast(p.device.type for p in self.params):
                norms = self._flush(max_grad_norm, mine)
        except BaseException:
            # Some layers' captures are released, some clipped sums formed: a retry would clip the rest against a
            # partial norm. The micro-batch is dropped whole; nothing of it reaches the sums.
            self.clear()
            raise
        finally:
            self._flushing = False
        for key, value in mine.items():
            sums[key] = sums[key] + value if key in sums else value
        return norms

    def _flush(self, max_grad_norm: float, sums: dict[int, torch.Tensor]) -> torch.Tensor:
        if not self.pending:
            self.clear()
            return torch.zeros(0, device=self.params[0].device)
        batch = self._batch_size()
        # A mean-reduced loss scales every captured output gradient by 1/batch: undone here, as a factor on
        # the (quadratic) squared norms and the (linear) clipped sums rather than a pass over the gradients.
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        data = {name: self._tokens(name) for name in self.layers}
        # Squared per-example norms, one [B] part per layer (or Gram group), summed once: from the captured (unscaled)
        # output gradients, times scale^2 at the end; and those already in the loss's scale (generic layers).
        captured_sq: list[torch.Tensor] = []
        own_sq: list[torch.Tensor] = []
        margin_sq = None  # bf16 clipped sums' error bounds (layers.split_error_bounds), squared, summed over layers
        generic_grads = {}
        ghost: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # input -> (input, output grads)
        bias_grads = {}  # linear layers: per-example bias gradients [B, p] (instantiated layers: in data)

        for name, (module, kind) in self.layers.items():
            if data[name] is None:
                continue
            if kind in ("linear", "conv1d_hf") and self.instantiate.get(name):
                captured_sq.extend(p.reshape(batch, -1).pow(2).sum(1) for p in data[name][1:] if p is not None)
            elif kind in ("linear", "conv1d_hf"):
                a, g = data[name]
                if _trainable_bias(module):
                    bias_grads[name] = layers.linear_per_example_grads(a, g, weight=False, bias=True)[1]
                    captured_sq.append(bias_grads[name].pow(2).sum(1))
                if module.weight.requires_grad and layers.splits(a, g):
                    e = (scale * layers.split_error_bounds(a, g)).pow(2)
                    margin_sq = e if margin_sq is None else margin_sq + e
                if module.weight.requires_grad and layers.use_ghost(a.shape[1], a.shape[2], g.shape[2]):
                    # Layers that read the very same tensor share its Gram.
                    key = (a.data_ptr(), a.shape, a.stride(), a.dtype, a.device)
                    ghost.setdefault(key, (a, []))[1].append(g)
                elif module.weight.requires_grad:
                    captured_sq.append(layers.linear_sq_norms(a, g, weight=True, bias=False))
            elif kind == "embedding":
                if not module.weight.requires_grad:  # frozen since make_private
                    continue
                ids, g = data[name]
                captured_sq.append(layers.embedding_sq_norms(ids, g, module.padding_idx))
            else:
                calls, sc = data[name], scale
                params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
                total = None
                for c in calls:
                    g = c.grad if sc == 1.0 else c.grad * sc
                    per = layers.norm_per_example_grads(module, c.inputs[0], g, set(params))
                    # torch.func re-runs the forward: under the autocast state it ran under (a bf16 input meets
                    # fp32 parameters there); its per-example gradients come back in fp32 for the norms and sums.
                    with _mixed.autocast_as(g.device.type, c.autocast):
                        if per is None:
                            per = self._checked_closed_form(name, module, params, c.inputs, g)
                        if per is None:
                            per = layers.per_example_grads(module, params, c.inputs, g)
                    per = {n: v.reshape(batch, -1, *v.shape[1:]).sum(1) for n, v in per.items()}  # rows -> examples
                    total = per if total is None else {n: total[n] + per[n] for n in per}
                generic_grads[name] = total
                own_sq.extend(v.reshape(batch, -1).pow(2).sum(1) for v in total.values())
        for a, gs in ghost.values():
            captured_sq.append(layers.ghost_sq_norms(a, gs))
        ghost.clear()
        for emb, head in self.tied:
            if data[emb] is None or data[head] is None or not self.layers[emb][0].weight.requires_grad:
                continue
            ids, g_emb = data[emb]
            a_head, g_head = data[head]
            captured_sq.append(2 * layers.embedding_linear_cross(ids, g_emb, a_head, g_head,
                                                                 self.layers[emb][0].padding_idx))
        for emb, head in self.tied:
            if data[emb] is None or not self.layers[emb][0].weight.requires_grad:
                continue
            ids, g_emb = data[emb]
            for h in self.head_calls.get(head, ()):  # the head used by the fused loss (ids checked by _tokens)
                captured_sq.append(2 * h.cross(ids, g_emb, self.layers[emb][0].padding_idx))
        for heads in self.head_calls.values():
            for h in heads:  # squared norms and bounds already in the delivered (captured) units
                captured_sq.append(h.sq)
                if h.margin is not None:
                    e = (scale * h.margin).pow(2)
                    margin_sq = e if margin_sq is None else margin_sq + e
        sq = _summed(captured_sq)
        if sq is not None and scale != 1.0:
            sq = sq * scale**2
        if own_sq:
            sq = _summed(own_sq) if sq is None else sq + _summed(own_sq)
        norms = sq.clamp(min=0).sqrt()
        # The errors of the layers' clipped sums add up to at most sqrt(sum of their bounds^2) (Minkowski): counted
        # in the norm the coefficient divides by, they cannot take an example's contribution past C.
        bound = norms if margin_sq is None else norms + margin_sq.sqrt()
        # An example whose gradient is not finite (an inf or NaN loss, an fp16 overflow) has no norm to clip by:
        # it contributes nothing, which is within C, so the step and its charge stand. Refusing the step instead
        # would make whether there is one depend on that example, outside the accounting.
        coef = layers.Coefficients(
            torch.where(torch.isfinite(bound), (max_grad_norm / (bound + 1e-6)).clamp(max=1.0), 0))
        captured_coef = coef.scaled_by(scale)  # for the captured (unscaled) output gradients

        def weighted(per_example):  # sum_i c_i per_example[i]
            return layers.weighted_sum(per_example, captured_coef)

        def accumulate(p, value):
            if p.requires_grad:
                sums[id(p)] = sums[id(p)] + value if id(p) in sums else value

        # Each layer's captured tensors are released once its clipped sum is formed: the parameter gradients
        # grow as they shrink, so the step's peak stays that of the end of the backward pass.
        for name, (module, kind) in self.layers.items():
            for head in self.head_calls.get(name, ()):
                for p, value in zip((module.weight, module.bias), head.clipped_sums(coef)):
                    if value is not None:
                        accumulate(p, value.mul_(scale) if scale != 1.0 else value)
            entry, data[name] = data[name], None
            self._release(name)
            if entry is None:
                continue
            if kind in ("linear", "conv1d_hf"):
                # sum_i c_i (per-example gradient) where those exist, else one matmul with the rows of G scaled
                if self.instantiate.get(name):
                    per_weight, per_bias = entry[1:]
                    weight = None if per_weight is None else weighted(per_weight)
                else:
                    per_bias = bias_grads.pop(name, None)
                    weight = None
                    if module.weight.requires_grad:
                        # The mean's factor goes on the product: on the rows it could take a large input past
                        # the float range, and the inf would reach every example's contribution.
                        weight = layers.linear_clipped_sum(*entry, coef)
                        if scale != 1.0:
                            weight.mul_(scale)
                if weight is not None:
                    accumulate(module.weight, weight if kind == "linear" else weight.t())
                if per_bias is not None:
                    accumulate(module.bias, weighted(per_bias))
            elif kind == "embedding":
                if not module.weight.requires_grad:  # frozen since make_private: no [V, d] sum to throw away
                    continue
                ids, g = entry
                accumulate(module.weight, layers.embedding_clipped_sum(ids, g, captured_coef, module.num_embeddings,
                                                                       module.padding_idx))
            else:
                for n, per in generic_grads.pop(name).items():
                    accumulate(getattr(module, n), layers.weighted_sum(per, coef))
        self.clear()
        return norms
