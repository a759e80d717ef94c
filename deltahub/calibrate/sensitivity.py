"""How much an error in each weight matrix moves a model's output, measured on calibration tokens.

Used by ``compress --avg-bits / --max-size`` to choose how many sign planes each matrix gets.

For a weight ``W`` (stored ``[N, K]``) and an error ``E`` in it, the change of the model's output
distribution is, to second order, ``KL(p‖p_E) ≈ ½ vec(E)ᵀ F vec(E)`` with ``F`` the Fisher information
of the model at the fine-tune. Its diagonal, for a ``Linear`` layer ``y = x·Wᵀ``, is
``F[n, k] = Σ_t g_t[n]² · x_t[k]²`` over tokens ``t`` (``g`` the gradient of the log-likelihood at the
layer's output, ``x`` its input). Keeping it whole costs a model's worth of memory; it is factored as
``F[n, k] ≈ a[n] · b[k]`` with ``a = Σ_t g_t²`` and ``b = Σ_t x_t² / T``, two vectors per layer, so

    weighted_error(E) = Σ_terms aᵀ (E ⊙ E) b

(a sum over terms because a tied weight is used by several layers: the embedding and the LM head).
Gradients use labels **sampled from the model itself** (the true Fisher, not the empirical one), so the
figure approximates ``KL(fine-tune ‖ fine-tune with that error)`` summed over the calibration tokens.

Layers: ``nn.Linear`` (``W [out, in]``), transformers' ``Conv1D`` (GPT-2, ``W [in, out]``) and
``nn.Embedding`` (``W [vocab, dim]``: ``a`` counts each row's tokens, ``b`` is the mean squared
gradient at the embedding's output). Other tensors get no entry.

Only activations carry gradients: the parameters never get a ``.grad`` (no model-sized buffers).

**Measured, per role.** The diagonal, factored Fisher ignores how errors interact (the entries of a
row feeding one output, the layers of a role together), and its accuracy differs between roles by an
order of magnitude: on the SmolLM2 pair of ``bench/fidelity.py`` the KL that one sign plane really
causes is 1.5–7x the Fisher's figure for the embedding and ``down_proj``, 16–60x for ``gate_proj``,
``up_proj`` and ``o_proj``. So a budget ranks **roles** (the tensors that share a name up to the
layer number: every ``q_proj``, every ``down_proj``, the embedding) by the KL measured with each role
coarsened to 1…k planes (:func:`measure_roles`: one forward pass per role and plane count), and the
Fisher only ranks the tensors within a role.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.progress import progress_bar

__all__ = ["NonFiniteOutputError", "Sensitivity", "measure_roles", "measure_sensitivity", "role_of"]

logger = logging.getLogger(__name__)


class NonFiniteOutputError(ValueError):
    """The model's logits hold NaN or Inf (its weights do): no sensitivity can be measured."""


@dataclass
class Sensitivity:
    """Fisher weights of one stored weight matrix ``[N, K]``: ``F ≈ Σ_terms outer(rows, cols)``.

    ``terms``: pairs of fp32 ``rows [N]`` and ``cols [K]`` (CPU), all ≥ 0.
    """

    terms: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def weighted_error(self, error: Tensor) -> float:
        """``Σ_terms rowsᵀ (error ⊙ error) cols`` for an error ``[N, K]`` (any float dtype), in float64."""
        sq = error.to(torch.float32).square()
        total = 0.0
        for rows, cols in self.terms:
            total += float((rows.to(sq.device) @ sq).double() @ cols.to(sq.device).double())
        return total

    def total(self) -> float:
        """``Σ F`` over every entry (the weight of a uniform unit error)."""
        return sum(float(rows.double().sum() * cols.double().sum()) for rows, cols in self.terms)


class _Recorder:
    """Forward hooks that keep each layer's input statistics and make its output report its gradient."""

    def __init__(self, names: dict[int, list[str]]) -> None:
        self.names = names  # id(weight parameter) -> every name it has in the state dict
        self.rows: dict[tuple[int, int], Tensor] = {}  # (id(module), 0|1) -> accumulated vectors
        self.cols: dict[tuple[int, int], Tensor] = {}
        self.layers: dict[int, tuple[nn.Module, str]] = {}  # id(module) -> (module, kind)
        self.tokens = 0

    @staticmethod
    def _add(acc: dict, key: Any, value: Tensor) -> None:
        value = value.detach().to("cpu", torch.float32)
        if key in acc:
            acc[key] += value
        else:
            acc[key] = value.clone()

    def hook(self, kind: str) -> Callable[..., Any]:
        def forward_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not isinstance(output, Tensor) or not args:
                return None
            mid = id(module)
            self.layers[mid] = (module, kind)
            x = args[0]
            if kind == "embedding":
                counts = torch.bincount(x.reshape(-1), minlength=module.weight.shape[0])
                self._add(self.rows, mid, counts.to(torch.float32))
                output = output.requires_grad_(True) if not output.requires_grad else output
            else:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).square().sum(0)
                self._add(self.cols if kind == "linear" else self.rows, mid, x2)

            def grad_hook(g: Tensor) -> None:
                g2 = g.detach().reshape(-1, g.shape[-1]).to(torch.float32).square().sum(0)
                self._add(self.rows if kind == "linear" else self.cols, ("g", mid), g2)

            if output.requires_grad:
                output.register_hook(grad_hook)
            return output

        return forward_hook

    def result(self) -> dict[str, Sensitivity]:
        out: dict[str, Sensitivity] = {}
        t = max(1, self.tokens)
        for mid, (module, kind) in self.layers.items():
            weight = module.weight
            if kind == "linear":  # W [out, in]: rows = Σ g², cols = Σ x² / T
                rows, cols = self.rows.get(("g", mid)), self.cols.get(mid)
                if rows is None or cols is None:
                    continue
                term = (rows, cols / t)
            elif kind == "conv1d":  # W [in, out]: rows = Σ x² / T, cols = Σ g²
                rows, cols = self.rows.get(mid), self.cols.get(("g", mid))
                if rows is None or cols is None:
                    continue
                term = (rows / t, cols)
            else:  # embedding W [vocab, dim]: rows = token counts, cols = Σ g² / T
                rows, cols = self.rows.get(mid), self.cols.get(("g", mid))
                if rows is None or cols is None:
                    continue
                term = (rows, cols / t)
            for name in self.names.get(id(weight), []):
                out.setdefault(name, Sensitivity()).terms.append(term)
        return out


def _kind(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == weight.shape[1]:
        return "conv1d"
    return None


def measure_sensitivity(
    model: nn.Module,
    tokens: Tensor,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Sensitivity]:
    """Fisher weights of every 2-D weight of ``model`` (a causal LM returning ``.logits``) on
    ``tokens`` (int64 ``[S, T]``), keyed by the weight's state-dict names (a tied weight under each
    of its names). One forward and one backward pass per batch; the model is left unchanged.

    Raises:
        ValueError: the model has no embedding layer (activations could not carry gradients).
    """
    names: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        if pname.endswith("weight") and param.dim() == 2:
            names.setdefault(id(param), []).append(pname)
    recorder = _Recorder(names)
    handles = []
    for module in model.modules():
        kind = _kind(module)
        if kind is not None:
            handles.append(module.register_forward_hook(recorder.hook(kind)))
    if not any(_kind(m) == "embedding" for m in model.modules()):
        for h in handles:
            h.remove()
        raise ValueError("the model has no nn.Embedding layer to start the gradients from")
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        s = tokens.shape[0]
        with progress_bar(s, "sensitivity", unit="sample") as bar:
            for start in range(0, s, batch_size):
                x = tokens[start : start + batch_size].to(device)
                logits = model(input_ids=x).logits.float()
                if not bool(torch.isfinite(logits).all()):
                    raise NonFiniteOutputError("the model's outputs hold NaN or Inf")
                logp = torch.log_softmax(logits, dim=-1)
                with torch.no_grad():
                    probs = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()
                    labels = torch.multinomial(probs, 1, generator=gen).reshape(x.shape).to(logp.device)
                nll = -logp.gather(-1, labels[..., None]).sum()
                nll.backward()
                recorder.tokens += x.numel()
                del logits, logp, probs, nll
                bar.update(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    result = recorder.result()
    logger.info("measured the sensitivity of %d weight(s) on %d tokens", len(result), recorder.tokens)
    return result


_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def role_of(name: str) -> str:
    """A tensor's role: its name with layer numbers replaced by ``N``
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.N.mlp.up_proj.weight``)."""
    return _LAYER_NUMBER.sub("N", name)


def measure_roles(
    model: nn.Module,
    tokens: Tensor,
    roles: Mapping[str, Sequence[str]],
    prefixes: Callable[[str], Callable[[int], Tensor]],
    planes: int,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> dict[str, list[float]]:
    """The KL each role's coarsening causes: ``{role: [KL with 1 plane, …, with planes planes]}``.

    ``roles``: role -> state-dict names of ``model``'s weights (:func:`role_of`). ``prefixes(name)``
    gives, for that tensor, a function from a plane count ``k`` to its reconstruction with ``k``
    planes (a tensor of its shape); it is called once per tensor while its role is measured, so an
    encoding can be kept for the role's duration only. For ``k = 1 … planes`` every tensor of the role
    is replaced by its ``k``-plane reconstruction and the mean KL per token (nats) from ``model``'s
    own output on ``tokens`` (int64 ``[S, T]``) is measured; the weights are put back afterwards,
    also on an error. Tied names (one parameter) are replaced once.
    """
    from deltahub.calibrate.targets import DEFAULT_TOP_K, choose_top_k, run_pass

    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, list[float]] = {}
    if not roles:
        return out
    s, t = (int(d) for d in tokens.shape)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    top_k = choose_top_k(s, t, vocab, DEFAULT_TOP_K) if vocab else None
    reference = run_pass(model, tokens, batch_size, device, keep_targets=True, top_k=top_k, desc="reference")
    assert reference.targets is not None
    with progress_bar(len(roles) * planes, "measure roles", unit="pass") as bar:
        for role, members in sorted(roles.items()):
            unique: dict[int, tuple[nn.Parameter, Callable[[int], Tensor]]] = {}
            for name in members:
                param = params[name]
                if id(param) not in unique:
                    unique[id(param)] = (param, prefixes(name))
            saved = [(param, param.data) for param, _ in unique.values()]
            curve: list[float] = []
            try:
                for k in range(1, planes + 1):
                    for param, at in unique.values():
                        approx = at(k)
                        if tuple(approx.shape) != tuple(param.shape):
                            raise ValueError(f"a {k}-plane reconstruction of {role} has shape {list(approx.shape)}, "
                                             f"not {list(param.shape)}")
                        param.data = approx.to(device=param.device, dtype=param.dtype)
                    stats = run_pass(model, tokens, batch_size, device, against=reference.targets, desc=f"{role} at {k}")
                    curve.append(float(stats.mean_kl or 0.0))
                    bar.update(1)
            finally:
                for param, data in saved:
                    param.data = data
            out[role] = curve
            logger.info("KL of %s (%d tensor(s)) at 1..%d planes: %s", role, len(members), planes,
                        ", ".join(f"{v:.3g}" for v in curve))
    return out
