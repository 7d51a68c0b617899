"""Where the CRMT head's time goes at small K (issue 24): the head's fwd+bwd as it is (W~ cache
cleared: a training step), the same head with W~ from a Cholesky-QR autograd Function (float64 Gram,
the QR's backward formula), the QR alone and the Cholesky-QR alone, against the reference's per-row
loop (``ReferenceHead`` of benchmarks/bench_head.py). K = 31, d = 512 x 2, B = 64, one thread; medians
of process CPU time over 30 interleaved rounds of 5 calls.

    OMP_NUM_THREADS=1 python benchmarks/bench_head_small_k.py
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
from crmt_plugin.head import CRMTHead  # noqa: E402


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


def main() -> None:
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

    fns = {"reference": run_reference, "CRMT head": run_head, "head with Cholesky-QR": run_cholesky_head,
           "QR alone": run_qr, "Cholesky-QR alone": run_cholesky}
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


if __name__ == "__main__":
    main()
