"""Where the CRMT head's time goes at small K (issue 24): the head's fwd+bwd as it is (W~ cache
cleared: a training step), the same head with W~ from a Cholesky-QR autograd Function (float64 Gram,
the QR's backward formula), the QR alone and the Cholesky-QR alone, against the reference's per-row
loop (``ReferenceHead`` of benchmarks/bench_head.py). K = 31, d = 512 x 2, B = 64, one thread; medians
of process CPU time over 30 interleaved rounds of 5 calls. Two lower bounds for an eager head: the whole
head as one autograd Function on stacked parameters (batched QR, the backward written out) and the same
head as four plain operators; ``--compile`` adds the latter under ``torch.compile`` (needs a C++ compiler).

    OMP_NUM_THREADS=1 python benchmarks/bench_head_small_k.py [--compile]
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_head import ReferenceHead  # noqa: E402
from crmt_plugin.head import CRMTHead, orthonormalize_rows  # noqa: E402


class CholeskyQR(torch.autograd.Function):
    """W~ = L^{-1} V with L L^T = V V^T (float64): the QR's W~ with positive diag(R), R = L^T."""

    @staticmethod
    def forward(ctx, v):
        v64 = v.double()
        low = torch.linalg.cholesky(v64 @ v64.mT)
        w = torch.linalg.solve_triangular(low, v64, upper=False).to(v.dtype)
        ctx.save_for_backward(w, low.mT.to(v.dtype))
        return w

    @staticmethod
    def backward(ctx, grad):
        w, r = ctx.saved_tensors
        q = w.mT
        m = grad @ q
        rhs = torch.addmm(grad.mT, q, m.tril() + m.tril(-1).mT, alpha=-1)
        return torch.linalg.solve_triangular(r.mT, rhs, upper=False, left=False).mT


class FusedBatchedHead(torch.autograd.Function):
    """The whole head (equal widths) as one autograd Function: one batched QR of the stacked V (M, K, d) in the
    forward, one batched matmul for the M uni-modal logits, and the backward written out (the QR's formula,
    batched): the fewest operators and autograd nodes an eager implementation can have. Inputs: x (B, M d),
    a (M, K), bias (K,), V (M, K, d); outputs: fused (B, K), z (M, B, K)."""

    @staticmethod
    def forward(ctx, x, a, bias, v):
        m, _, d = v.shape
        q, r = torch.linalg.qr(v.mT)
        signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) >= 0, 1.0, -1.0)
        w = (q * signs[:, None, :]).mT  # (M, K, d)
        xs = x.view(x.shape[0], m, d).transpose(0, 1)  # (M, B, d)
        z = torch.bmm(xs, w.mT)  # (M, B, K)
        ctx.save_for_backward(xs, a, w, r * signs[:, :, None], z)
        return bias + (a[:, None, :] * z).sum(0), z

    @staticmethod
    def backward(ctx, grad_fused, grad_z):
        xs, a, w, r, z = ctx.saved_tensors
        g = grad_fused.unsqueeze(0) * a[:, None, :]
        if grad_z is not None:
            g = g + grad_z
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g, w).transpose(0, 1).reshape(grad_fused.shape[0], -1)
        grad_w = torch.bmm(g.mT, xs)
        mm = torch.bmm(grad_w, w.mT)
        rhs = torch.baddbmm(grad_w, mm.tril() + mm.tril(-1).mT, w, alpha=-1)
        grad_v = torch.linalg.solve_triangular(r, rhs, upper=True, left=True)
        return grad_x, (grad_fused.unsqueeze(0) * z).sum(1), grad_fused.sum(0), grad_v


def functional_head(x, v, alpha, bias):
    """The head as four plain operators on stacked parameters (autograd differentiates the QR)."""
    w = orthonormalize_rows(v)  # (M, K, d): the head's own map, batched over modalities
    z = torch.einsum("bmd,mkd->mbk", x.view(x.shape[0], v.shape[0], v.shape[2]), w)
    return bias + (F.softplus(alpha)[:, None, :] * z).sum(0), z


def main() -> None:
    compiled = "--compile" in sys.argv  # torch.compile needs a C++ compiler; opt-in
    torch.set_num_threads(1)
    k, d, b = 31, 512, 64
    torch.manual_seed(0)
    head = CRMTHead({"audio": d, "visual": d}, k)
    reference = ReferenceHead([d, d], k)
    x, y = torch.randn(b, 2 * d), torch.randint(0, k, (b,))

    def loss_of(fused, outs):
        return F.cross_entropy(fused, y) + sum(z.mean() for z in outs)

    def run_reference():
        outs, fused = reference(x)
        loss_of(fused, outs).backward()
        reference.zero_grad(set_to_none=True)

    def run_head():
        head.clear_cache()
        fused = head(x)
        loss_of(fused, head.pop_last()["unimodal"].values()).backward()
        head.zero_grad(set_to_none=True)

    def run_cholesky_head():
        weights = [CholeskyQR.apply(head.directions[n]) for n in head.widths]
        outs = [F.linear(p, w) for p, w in zip(torch.split(x, [d, d], dim=-1), weights)]
        a = F.softplus(torch.stack([head.integration[n] for n in head.widths]))
        fused = head.bias
        for i, z in enumerate(outs):
            fused = torch.addcmul(fused, a[i], z)
        loss_of(fused, outs).backward()
        head.zero_grad(set_to_none=True)

    def run_qr():
        for n in head.widths:
            q, _ = torch.linalg.qr(head.directions[n].mT)
            q.sum().backward()

    def run_cholesky():
        for n in head.widths:
            CholeskyQR.apply(head.directions[n]).sum().backward()

    stacked_v = torch.nn.Parameter(torch.stack([head.directions[n].detach() for n in head.widths]))
    stacked_alpha = torch.nn.Parameter(torch.stack([head.integration[n].detach() for n in head.widths]))
    bias = torch.nn.Parameter(head.bias.detach().clone())

    def stacked_step(forward):
        def run():
            fused, z = forward(x, stacked_v, stacked_alpha, bias)
            (F.cross_entropy(fused, y) + z.mean(dim=(1, 2)).sum()).backward()
            stacked_v.grad = stacked_alpha.grad = bias.grad = None
        return run

    def fused_forward(x, v, alpha, b):
        return FusedBatchedHead.apply(x, F.softplus(alpha), b, v)

    fns = {"reference": run_reference, "CRMT head": run_head, "head with Cholesky-QR": run_cholesky_head,
           "QR alone": run_qr, "Cholesky-QR alone": run_cholesky,
           "fused batched Function": stacked_step(fused_forward), "functional, batched": stacked_step(functional_head)}
    if compiled:
        fns["functional, torch.compile"] = stacked_step(torch.compile(functional_head))
    for fn in fns.values():
        for _ in range(5):
            fn()
    times = {name: [] for name in fns}
    for _ in range(30):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(5):
                fn()
            times[name].append((time.process_time() - t0) / 5)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    for name, t in med.items():
        print(f"{name:24s} {1e3 * t:7.3f} ms  (reference / this {med['reference'] / t:5.1f}x)")
    free = med["CRMT head"] - med["QR alone"]
    print(f"bound with a free orthonormalisation: reference / (head - QR) = {med['reference'] / free:.1f}x")
    w = head.unimodal_weight("audio")
    print(f"Cholesky-QR vs QR, max |W~ difference|: {(w - CholeskyQR.apply(head.directions['audio'])).abs().max():.2e}")
    # the fused Function's gradients against autograd through the plain functional head
    grads = []
    for forward in (fused_forward, functional_head):
        fused, z = forward(x, stacked_v, stacked_alpha, bias)
        loss = F.cross_entropy(fused, y) + z.mean(dim=(1, 2)).sum()
        grads.append(torch.autograd.grad(loss, [stacked_v, stacked_alpha, bias]))
    worst = max(float((g1 - g2).abs().max() / g2.abs().max()) for g1, g2 in zip(*grads))
    print(f"fused batched Function vs autograd, max relative gradient difference: {worst:.1e}")


if __name__ == "__main__":
    main()
