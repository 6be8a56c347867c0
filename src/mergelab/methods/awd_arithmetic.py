"""Arithmetic whose bytes do not depend on the CPU: sums in a fixed order and optimiser steps as separate
elementwise ops (AWD's fit, :mod:`mergelab.methods.awd_objective` and :mod:`mergelab.methods.awd_module`).

Every sum is a fixed tree of elementwise additions (:func:`tree_sum`) and every optimiser step a sequence of
elementwise ops that each round once (:class:`ElementwiseAdam`, :class:`ElementwiseSGD`): no BLAS, no vectorised
reduction, no fused multiply-add, so the same inputs give the same bytes with any thread count, SIMD width or BLAS,
i.e. on any CPU (tests/test_awd_kernels.py, experiments/awd_kernels.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def tree_sum(x: Tensor, dim: int = -1) -> Tensor:
    """Sum over ``dim`` in a fixed order made of elementwise additions only (no reduction kernel, no BLAS).

    Element i is added to element i + ceil(n/2), halving the length until one is left. Each addition is one IEEE
    rounding, whatever the SIMD width the kernel was compiled for (``ATEN_CPU_CAPABILITY``), the CPU, the BLAS or
    the thread count, so the sum has the same bytes on any machine. torch's own ``sum`` does not: its vectorised
    reduction keeps one partial sum per SIMD lane (8 lanes with AVX2, 16 with AVX-512), so its order follows the
    CPU; a GEMM's order follows its blocking. (Fastest over an outer dim: each half is then contiguous.)
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    if n == 0:
        return x.sum(dim)  # zeros
    while n > 1:
        h, c = n // 2, n - n // 2
        if h == c:
            x = x.narrow(dim, 0, h) + x.narrow(dim, h, h)
        else:  # odd: the middle element is carried to the next level as it is
            x = torch.cat([x.narrow(dim, 0, h) + x.narrow(dim, c, h), x.narrow(dim, h, 1)], dim=dim)
        n = c
    return x.squeeze(dim)


def tree_sum_(x: Tensor, dim: int) -> Tensor:
    """:func:`tree_sum` in place in ``x`` (a work buffer, overwritten): the same pairs, the same bytes, no allocation
    (fresh pages for every temporary cost more than the arithmetic). Returns a view of the sums."""
    n = x.shape[dim]
    while n > 1:
        h, c = n // 2, n - n // 2
        x.narrow(dim, 0, h).add_(x.narrow(dim, c, h))  # element h (n odd) stays, as in tree_sum
        n = c
    return x.narrow(dim, 0, 1).squeeze(dim)


class FixedSum(torch.autograd.Function):
    """:func:`tree_sum` over ``dim``, differentiable (the gradient is the output's, broadcast: exact)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> Tensor:
        ctx.shape, ctx.dim = x.shape, dim
        return tree_sum(x, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.unsqueeze(ctx.dim).expand(ctx.shape), None


def fixed_sum(x: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` (all of it, or over ``dim``) in a fixed order (:func:`tree_sum`): the same bytes with any number
    of threads, on any CPU and under any kernel choice."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    return FixedSum.apply(x, dim % x.dim())


class ElementwiseAdam(torch.optim.Optimizer):
    """Adam (torch's defaults: betas 0.9, 0.999, eps 1e-8, no weight decay) written as separate elementwise ops.

    ``torch.optim.Adam``'s kernels (``lerp_``, ``addcmul_``, ``addcdiv_``) fuse a multiply and an add, with one
    rounding (FMA) in the AVX2/AVX-512 builds of the kernel and two in the default one, so its iterates follow the
    CPU. Here each op rounds once on any CPU: m += (g - m)(1 - b1); v = v b2 + g (1 - b2) g;
    p += (m / (sqrt(v) / sqrt(1 - b2^k) + eps)) (-lr / (1 - b1^k)) — torch's update, up to rounding."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                k, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.add_((g - m).mul_(1 - b1))
                v.mul_(b2).add_(g.mul(1 - b2).mul_(g))
                denom = v.sqrt().div_(math.sqrt(1 - b2**k)).add_(group["eps"])
                p.add_(m.div(denom).mul_(-group["lr"] / (1 - b1**k)))
        return loss


class ElementwiseSGD(torch.optim.Optimizer):
    """SGD with momentum (no dampening, no weight decay) as separate elementwise ops (see :class:`ElementwiseAdam`):
    buf = buf * momentum + g (buf = g at the first step), p += buf * (-lr)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                    g = state["momentum_buffer"]
                p.add_(g.mul(-group["lr"]))
        return loss
