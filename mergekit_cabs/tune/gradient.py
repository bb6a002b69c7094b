"""The exact gradient of the search's objective with respect to lambda and
every coefficient, through the weight store, in one backward pass.

The coefficients enter the merge linearly.  For a merged tensor t whose
slot takes coefficient column c(t) (`Slot.group`):

    W_t = base_t + lambda * sum_k w[c(t)][k] * (tau_k,t * mask_k,t)

(tau = fine-tune minus base: exactly the kernel's sum before it is rounded
to the merge dtype), so with G_t = dL/dW_t

    dL/dw[c][k] = lambda * sum_{t in c} <G_t, tau_k,t * mask_k,t>
    dL/dlambda  = sum_t sum_k w[c(t)][k] <G_t, tau_k,t * mask_k,t>.

Each merged parameter's gradient is reduced to its K inner products the
moment autograd has accumulated it (a post-accumulate-grad hook) and freed
at once, so the weight gradients are never all held: at most one merged
tensor's gradient (two while a tied one is accumulated) lives at a time.

Limitation: this is the gradient of the linear merge before it is rounded
to the merge dtype (and to the scoring dtype); the rounding's steps have no
useful derivative.  A point the gradient search chooses is re-scored by the
real merge (`WeightStore.apply` and the kinds' own `score`) elsewhere.

Columns: a slot's `group`, as the store gives it from the coefficients'
shape (`groups.make_columns`: one per model, per layer or layer group, or
per merged tensor); the flat order is the search's: lambda, then the
weights model-major, each model's columns in order (`names`, `rows`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from mergekit_cabs.kernel import compute_dtype
from mergekit_cabs.tune.smooth import check_differentiable, item_losses, task_items
from mergekit_cabs.tune.store import APPLY_CHUNK, Slot, WeightStore

# --- one merged tensor's gradient reduced to its K numbers ---------------------------


def slot_slopes(slot: Slot, grad: torch.Tensor) -> torch.Tensor:
    """<grad, tau_j * mask_j> for each input j of the slot: float64, on the
    CPU.  tau is computed as the kernel computes it (float32, or float64 for
    float64 inputs, from the store's tensors streamed a chunk at a time to
    the gradient's device); each product and sum is taken in float64.  With
    disjoint supports this is a segmented sum of grad * (kept - base) by the
    owner index.  The chunk's float64 product is made in place in its copy of
    the gradient (no float64 tau, no separate product: 80 MB less per 4M
    chunk, the same numbers)."""
    dtype, device = compute_dtype(slot.base), grad.device
    flat = grad.reshape(-1)
    out = torch.zeros(len(slot.models) + 1, dtype=torch.float64, device=device)
    for start in range(0, flat.numel(), APPLY_CHUNK):
        where = slice(start, start + APPLY_CHUNK)
        g = flat[where].to(torch.float64, copy=True)  # multiplied in place below: never the gradient itself
        base = slot.base[where].to(device).to(dtype)
        if slot.owner is not None:  # g * tau in place, in float64 (tau widened exactly); an int32 index
            g.mul_(slot.kept[where].to(device).to(dtype) - base)
            out.index_add_(0, slot.owner[where].to(device).int(), g)
            continue
        for j, (t, mask) in enumerate(zip(slot.inputs, slot.masks)):
            tau = t[where].to(device).to(dtype) - base
            if mask is not None:
                tau = torch.where(mask[where].to(device), tau, 0)
            out[j + 1] += torch.dot(g, tau.to(torch.float64))
    return out[1:].cpu()


class GradientTap:
    """Within the block: only the live model's merged parameters require
    grad, and a hook on each reduces its gradient to the slot's K inner
    products (`slot_slopes`) as soon as autograd accumulates it, then drops
    it (`param.grad = None`); a hook that fires more than once (a tensor
    used twice, reentrant checkpointing) adds up.  Afterwards every
    parameter's requires_grad is as it was and the hooks are gone.

    A parameter written by two slots (tied weights both merged) belongs to
    the slot written last, whose merge the parameter holds.  `peak_grad_bytes`:
    the most bytes of merged parameters' gradients alive at once, counted
    inside the hooks; `calls`: hook firings."""

    def __init__(self, model, store: WeightStore):
        self.model, self.store = model, store
        params = {p.data_ptr(): p for _, p in model.named_parameters()}
        self.owner: dict[int, int] = {}  # id(parameter) -> index of its slot
        self.params: list[torch.nn.Parameter] = []
        for index, slot in enumerate(store.slots):
            param = params.get(slot.target.data_ptr())
            if param is None or param.numel() != slot.target.numel():
                raise RuntimeError(f"tune: the merged tensor '{slot.name}' is not a parameter of the live model")
            if id(param) not in self.owner:
                self.params.append(param)
            self.owner[id(param)] = index
        self.slopes: dict[int, torch.Tensor] = {}
        self.peak_grad_bytes, self.calls = 0, 0
        self.handles: list = []
        self.saved: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> GradientTap:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)
        for p in self.params:
            p.grad = None
            p.requires_grad_(True)
            self.handles.append(p.register_post_accumulate_grad_hook(self.reduce))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for p in self.params:
            p.grad = None
        for p, flag in self.saved:
            p.requires_grad_(flag)

    def reduce(self, param: torch.nn.Parameter) -> None:
        self.calls += 1
        held = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.peak_grad_bytes = max(self.peak_grad_bytes, held)
        index = self.owner[id(param)]
        slopes = slot_slopes(self.store.slots[index], param.grad)
        param.grad = None
        self.slopes[index] = slopes if index not in self.slopes else self.slopes[index] + slopes

    def gradient(self, rows: Sequence[Sequence[float]], lam: float) -> tuple[float, list[list[float]]]:
        """(dL/dlambda, dL/dw per column per model), float64, from the slopes
        gathered at the point (`rows`, `lam`) the model holds."""
        d_lam = torch.zeros((), dtype=torch.float64)
        d_rows = torch.zeros(len(rows), len(rows[0]), dtype=torch.float64)
        for index, slopes in self.slopes.items():
            slot = self.store.slots[index]
            weights = torch.tensor([rows[slot.group][i] for i in slot.models], dtype=torch.float64)
            d_lam += torch.dot(weights, slopes)
            d_rows[slot.group, list(slot.models)] += lam * slopes
        return float(d_lam), d_rows.tolist()


# --- memory: checkpointing the decoder layers ----------------------------------------


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's decoder layers: the first ModuleList with one module per
    `config.num_hidden_layers` (None: not found)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count), None)


@contextlib.contextmanager
def checkpointed(model, enabled: bool = True):
    """Within the block, each decoder layer's activations are recomputed in
    the backward pass instead of kept (torch.utils.checkpoint, non-reentrant):
    one layer's activations and every layer's input are held, not every
    layer's.  The model stays in eval mode (no dropout is switched on);
    nothing changes when not `enabled` or no decoder layers are found."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model) if enabled else None
    patched = []
    for layer in layers or ():
        def run(*args, _forward=layer.forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        layer.forward = run
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # the class's forward again


# --- the objective's gradient at a point ---------------------------------------------


def objective_slopes(objective, names: Sequence[str]) -> dict[str, float]:
    """d objective.score / d (each task's mean measure), float64.  Both
    objectives ("gain" and "loss") are affine in the task means, so the
    slopes are the same at every point; they are taken by autograd through
    `Objective.score` itself at the base's values."""
    leaves = {t: torch.tensor(float(objective.base.get(t, 1.0)), dtype=torch.float64, requires_grad=True)
              for t in names}
    score = objective.score(leaves)
    if not isinstance(score, torch.Tensor) or not score.requires_grad:
        return dict.fromkeys(names, 0.0)
    grads = torch.autograd.grad(score, list(leaves.values()), allow_unused=True)
    return {t: 0.0 if g is None else float(g) for t, g in zip(names, grads)}


def flat_gradient(d_lam: float, d_rows: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """The search's flat order: lambda, then each model's columns in turn."""
    models = len(d_rows[0])
    return (d_lam, *(d_rows[g][i] for i in range(models) for g in range(len(d_rows))))


def objective_gradient(live, objective, x: Sequence[float], picks: dict[str, Sequence[int]] | None = None, *,
                       split: str = "fit", checkpoint: bool = False,
                       stats: dict | None = None) -> tuple[float, tuple[float, ...]]:
    """The objective of the minibatch and its exact gradient at point `x`
    (lambda, then the weights as `live.groups.names` orders them).

    The live model is set to the merge at `x` with `WeightStore.apply` (as
    the other searches set it), then each task's items (`picks`: task name ->
    indices into its `split`, in order; a task not named: all of them) are
    scored with autograd on, batched as the kind's own `score` batches them
    (`smooth`), and each batch's share of the objective is back-propagated at
    once; each merged parameter's gradient is reduced to its K numbers by a
    hook (`GradientTap`) and freed.  The score is `objective.score` of the
    tasks' mean measures over those items (float64), the same arithmetic in
    the same dtypes as the real scoring; the gradient is float64 (of the
    linear merge before rounding: see the module's docstring).
    `checkpoint`: recompute each decoder layer's activations in the backward
    pass (`checkpointed`).  `stats`, when given, gets the tasks' means, the
    peak gradient bytes held and the hooks' firings."""
    check_differentiable(live.tasks)
    picks = picks or {}
    live.set(x)
    lam, rows = float(x[0]), live.groups.rows(x[1:], live.models)
    slopes = objective_slopes(objective, [t.name for t in live.tasks])
    means: dict[str, float] = {}
    with GradientTap(live.model, live.store) as tap, checkpointed(live.model, checkpoint), torch.enable_grad():
        for task in live.tasks:
            items = task_items(task, split, picks.get(task.name))
            losses = item_losses(live.model, task, items, live.batch_size, slope=slopes[task.name] / len(items))
            means[task.name] = float(losses.mean())
        d_lam, d_rows = tap.gradient(rows, lam)
    if stats is not None:
        stats.update(means=means, peak_grad_bytes=tap.peak_grad_bytes, hook_calls=tap.calls)
    return objective.score(means), flat_gradient(d_lam, d_rows)


def objective_value(live, objective, x: Sequence[float] | None, picks: dict[str, Sequence[int]] | None = None,
                    split: str = "fit") -> float:
    """The objective of the items `picks` (as `objective_gradient`), without
    autograd; the model is set to `x` first unless `x` is None."""
    check_differentiable(live.tasks)
    picks = picks or {}
    if x is not None:
        live.set(x)
    with torch.no_grad():
        means = {t.name: float(item_losses(live.model, t, task_items(t, split, picks.get(t.name)),
                                           live.batch_size).mean()) for t in live.tasks}
    return objective.score(means)
