"""Per-example clipping without per-example gradients where they are not needed (plain PyTorch).

For a Linear layer with inputs a_i [T, d_in] and output gradients g_i [T, d_out] of example i, the weight
gradient is G_i = g_i^T a_i. Two ways to get what clipping needs:

- norms: *ghost* (Goodfellow, 2015; Li et al., 2022): ||G_i||^2 = <a_i a_i^T, g_i g_i^T>, cost T^2 (d_in + d_out),
  no G_i in memory; or *instantiated*: G_i itself, cost T d_in d_out. Per layer the cheaper one is used
  (as in mixed ghost clipping, Bu et al., 2022): ghost when T (d_in + d_out) < d_in d_out.
- the clipped sum: *book-keeping* (Bu et al., 2023): sum_i c_i G_i = (c * g)^T a, one matmul over the
  activations and output gradients kept from the single backward pass; no second backward.

A convolution is a Linear layer over its output positions: 1x1 convolutions (proj_in/proj_out of the
transformer blocks) over H W tokens of C channels, a k x k convolution over H' W' tokens of its unfolded input
patches (im2col, C k k values each; the weight viewed as [C_out, C k k]), so the full UNet's convolutions are
clipped the same way, without Opacus's per-example [n, C_out, C k k] gradients (as in Bu et al., 2022, mixed
ghost clipping for convolutions); their clipped sum is the convolution's own weight-gradient kernel applied to
the clipped output gradients, so the unfolded patches are not kept. Other trained layers
(GroupNorm, LayerNorm, grouped convolutions, Embedding) have few parameters: their per-example gradients come
from Opacus's grad samplers. The K noise draws of one
example are its adjacent rows: they are joined into one sequence (Linear) or summed (others), so the
*whole* gradient of the example's K-averaged loss is clipped once. Clip factors and the noise are Opacus's
(``C / (||g_i|| + 1e-6)`` capped at 1; noise and scaling by :class:`SummedGradDPOptimizer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from dpldm.errors import ConfigError

LinearNorms = Literal["auto", "ghost", "instantiate"]
Clipped = Callable[[Tensor, Tensor | None], dict[nn.Parameter, Tensor]]  # (clip factors [n], kept [n]) -> sums


def _fold(x: Tensor, n: int) -> Tensor:
    """[R, *, d] rows (R = n or n K, the K rows of an example adjacent) -> [n, K T, d] per example."""
    if x.shape[0] % n:
        raise RuntimeError(f"{x.shape[0]} rows for {n} examples")
    return x.reshape(n, -1, x.shape[-1])


def _is_pointwise_conv(m: nn.Module) -> bool:
    """A 1x1 convolution (the transformer blocks' proj_in/proj_out): a Linear layer over H W tokens."""
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1)


def _is_unfoldable_conv(m: nn.Module) -> bool:
    """A k x k convolution that is a Linear layer over its unfolded patches (zero padding, one group)."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_pointwise_conv(m) or _is_unfoldable_conv(m)


def _tokens(m: nn.Module, x: Tensor) -> Tensor:
    """A Linear-like layer's output gradient (or a 1x1 convolution's input) as tokens [R, *, d]."""
    return x.flatten(2).transpose(1, 2) if isinstance(m, nn.Conv2d) else x  # [R, C, H, W] -> [R, H W, C]


def _input_tokens(m: nn.Module, x: Tensor) -> Tensor:
    """A Linear-like layer's input as tokens [R, *, d_in]: a k x k convolution's as its patches
    [R, H' W', C k k] (im2col, in the order of ``weight.view(C_out, -1)``)."""
    if not isinstance(m, nn.Conv2d) or _is_pointwise_conv(m):
        return _tokens(m, x)
    return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)


def _zero_rows(x: Tensor, keep: Tensor) -> Tensor:
    """Rows of ``x`` [n, ...] where ``keep`` [n] is False set to 0 (``where``, so NaN and inf go too)."""
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, 0.0)


def _fold_samples(gs: Tensor, n: int) -> Tensor:
    """Per-row gradients [R, *shape] -> per-example [n, *shape] (the K rows of an example summed)."""
    return gs if gs.shape[0] == n else gs.view(n, -1, *gs.shape[1:]).sum(1)


def full_precision() -> contextlib.AbstractContextManager:
    """Autocast off (bf16-mixed training runs the step inside it): norms, clip factors, the clipped sum and
    the noise are computed in the precision of the fp32 master weights, not in bf16."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


class BookKeepingClipper:
    """Captures inputs and output gradients of the trained layers; turns them into the clipped sum.

    Args:
        trained: top modules whose parameters are trained.
        linear_norms: ``auto`` (cheaper per layer), ``ghost`` or ``instantiate`` for Linear layers.
    """

    def __init__(self, trained: Sequence[nn.Module], linear_norms: LinearNorms = "auto"):
        self.linear_norms, self.active = linear_norms, False
        self.layers = [m for top in trained for m in top.modules()
                       if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._trained = {id(p) for p in self.params}
        for m in self.layers:
            if not isinstance(m, nn.Linear) and type(m) not in GradSampleModule.GRAD_SAMPLERS:
                raise ConfigError("model.init_args.privacy.init_args.clipping", type(m).__name__,
                                  "has no per-example gradient rule here; use clipping: hooks")
        self.inputs: dict[nn.Module, list[Tensor]] = {}
        self.grads: dict[nn.Module, Tensor] = {}
        self._handles = [m.register_forward_hook(self._capture) for m in self.layers]

    def begin(self) -> None:
        """Start capturing. Weights stop requiring gradients for the step: autograd then computes only
        the gradients flowing between layers, never the (unclipped) weight gradients nobody uses."""
        self.active = True
        for p in self.params:
            p.requires_grad_(False)

    def end(self) -> None:
        self.active = False
        for p in self.params:
            p.requires_grad_(True)
        self.inputs.clear()
        self.grads.clear()

    def _capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        """Keep the layer's input; hook its output's gradient (the layer's g). A layer below every other
        trained one gets an output that requires grad: the backward pass starts there, no lower."""
        if not (self.active and torch.is_grad_enabled()):
            return None
        if module in self.inputs:
            raise RuntimeError(f"{type(module).__name__} ran twice in one forward; use clipping: hooks")
        self.inputs[module] = [x.detach() for x in inputs if isinstance(x, Tensor)]
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        output.register_hook(lambda grad: self.grads.__setitem__(module, grad.detach()))
        return output

    def _linear(self, m: nn.Linear | nn.Conv2d, n: int) -> tuple[Tensor, Clipped]:
        """Squared per-example norms [n] of a Linear-like layer (Linear, convolution), and how to make its
        clipped sum. Norms and sums in the weights' precision (fp32 master weights under bf16-mixed autocast).

        Ghost norms (cheap here) -> the clipped sum by book-keeping: (c g)^T a for a Linear layer, the
        convolution's own weight-gradient kernel on (c g) for a k x k one. Instantiated norms -> the
        per-example gradients G_i [n, d_out, d_in] are made anyway, so the sum is sum_i c_i G_i (no second
        pass over the tokens, T times cheaper than book-keeping)."""
        dtype = m.weight.dtype
        x = self.inputs[m][0]
        a = _fold(_input_tokens(m, x), n).to(dtype)  # [n, T', d_in]
        g = _fold(_tokens(m, self.grads[m]), n).to(dtype)  # [n, T', d_out]
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        ghost = self.linear_norms == "ghost" or (self.linear_norms == "auto" and t * (d_in + d_out) < d_in * d_out)
        weight = id(m.weight) in self._trained
        bias = m.bias is not None and id(m.bias) in self._trained
        per_example = None
        if ghost:  # <a a^T, g g^T>: [n, T', T'] Gram matrices, no [n, d_out, d_in] tensor
            sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        else:
            per_example = torch.bmm(g.transpose(1, 2), a)  # G_i [n, d_out, d_in]
            sq = per_example.pow(2).sum((1, 2))
        unfolded = isinstance(m, nn.Conv2d) and not _is_pointwise_conv(m)
        if unfolded or per_example is not None:
            a = None  # not needed for the sum (k x k patches are 9x the input: not kept across layers)
        if bias:
            sq = sq + g.sum(1).pow(2).sum(1)

        def clipped(c: Tensor, keep: Tensor | None) -> dict[nn.Parameter, Tensor]:
            cg = g if keep is None else _zero_rows(g, keep)
            cg = cg * c[:, None, None]  # [n, T', d_out]
            out = {}
            if weight and per_example is not None:  # sum_i c_i G_i (c_i = 0 where not kept)
                ge = per_example if keep is None else _zero_rows(per_example, keep)
                out[m.weight] = torch.einsum("n,nij->ij", c, ge).view_as(m.weight)
            elif weight and unfolded:  # the convolution's weight gradient for output gradients c_i g_i
                r = x.shape[0] // n  # rows per example (K noise draws, adjacent)
                xr = x.to(dtype) if keep is None else _zero_rows(x.to(dtype), keep.repeat_interleave(r))
                grad_out = self.grads[m].to(dtype) * c.repeat_interleave(r).view(-1, 1, 1, 1)
                if keep is not None:
                    grad_out = _zero_rows(grad_out, keep.repeat_interleave(r))
                out[m.weight] = torch.nn.grad.conv2d_weight(xr, m.weight.shape, grad_out, stride=m.stride,
                                                            padding=m.padding, dilation=m.dilation, groups=m.groups)
            elif weight:  # book-keeping: (c g)^T a
                aa = a if keep is None else _zero_rows(a, keep)
                out[m.weight] = (cg.reshape(-1, d_out).T @ aa.reshape(-1, d_in)).view_as(m.weight)
            if bias:
                out[m.bias] = cg.sum((0, 1))
            return out

        return sq, clipped

    def _sampled(self, m: nn.Module, n: int) -> tuple[Tensor, Clipped]:
        """The same for any layer with an Opacus grad sampler (per-example gradients instantiated)."""
        trained = [p for p in m.parameters(recurse=False) if id(p) in self._trained]
        for p in trained:  # Opacus's samplers only serve parameters that require grad
            p.requires_grad_(True)
        samples = GradSampleModule.GRAD_SAMPLERS[type(m)](m, self.inputs[m], self.grads[m])
        for p in trained:
            p.requires_grad_(False)
        samples = {p: _fold_samples(gs.to(p.dtype), n) for p, gs in samples.items() if id(p) in self._trained}
        sq = sum((gs.reshape(n, -1).pow(2).sum(1) for gs in samples.values()), torch.zeros(n, device=self.grads[m].device))

        def clipped(c: Tensor, keep: Tensor | None) -> dict[nn.Parameter, Tensor]:
            return {p: torch.einsum("n,n...->...", c, gs if keep is None else _zero_rows(gs, keep))
                    for p, gs in samples.items()}

        return sq, clipped

    def accumulate(self, num_examples: int, max_grad_norm: float) -> int:
        """After the backward of one micro-batch: clip each example's whole gradient, add the sum to
        ``p.summed_grad``, forget the captured tensors. An example whose gradient is not finite (its norm
        is inf or NaN) is zeroed instead; returns how many were."""
        with full_precision():
            return self._accumulate(num_examples, max_grad_norm)

    def _accumulate(self, num_examples: int, max_grad_norm: float) -> int:
        parts = [self._linear(m, num_examples) if _is_linear_like(m) else self._sampled(m, num_examples)
                 for m in self.layers if m in self.grads]
        norms = torch.stack([sq for sq, _ in parts]).sum(0).sqrt()  # [n]: over all trained parameters
        finite = torch.isfinite(norms)
        bad = int((~finite).sum())
        keep = finite if bad else None
        factor = torch.where(finite, max_grad_norm / (norms + 1e-6), 0.0).clamp(max=1.0)
        for _, clipped in parts:
            for p, s in clipped(factor, keep).items():
                p.summed_grad = s if getattr(p, "summed_grad", None) is None else p.summed_grad + s
        self.inputs.clear()
        self.grads.clear()
        return bad

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class SummedGradDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer for a clipped sum already in ``p.summed_grad`` (from :class:`BookKeepingClipper`):
    add N(0, sigma^2 C^2) once, divide by the expected batch size, step."""

    def pre_step(self, closure: object = None) -> bool:
        for p in self.params:
            if getattr(p, "summed_grad", None) is None:  # an empty Poisson batch, or an unused parameter
                p.summed_grad = torch.zeros_like(p)
        self.add_noise()
        for p in self.params:
            p.grad /= self.expected_batch_size
        self._is_last_step_skipped = False
        return True
