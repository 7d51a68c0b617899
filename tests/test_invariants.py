"""Property-based invariants of forward, loss and certify over random modalities, widths (K > d_m too),
classes, batches and dtypes, including soundness against the exact distance for linear encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from crmt_plugin import CRMTOutput, crmt_loss

from helpers import exact_distance, linear_model, wrap


@settings(max_examples=40, deadline=None)
@given(num_modalities=st.integers(2, 4), num_classes=st.integers(2, 6), batch=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16), data=st.data())
def test_forward_loss_and_certify_invariants(num_modalities, num_classes, batch, dtype, seed, data):
    names = [f"m{i}" for i in range(num_modalities)]
    widths = {n: data.draw(st.integers(1, 7), label=f"width {n}") for n in names}  # K > d_m happens
    in_dims = {n: data.draw(st.integers(1, 5), label=f"input {n}") for n in names}
    model = linear_model(in_dims, widths, num_classes, seed=seed, dtype=dtype)
    crmt = wrap(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            crmt.head.integration[n].copy_(3 * torch.randn(num_classes, generator=gen, dtype=torch.float64))
    x = {n: torch.randn(batch, in_dims[n], generator=gen).to(dtype) for n in names}
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}

    # forward: h = sum_m a^(m) z^(m) + b, z^(m) = W~^(m) phi^(m), a >= 0, orthonormal / unit rows
    out = crmt(x)
    head = crmt.head
    a = head.integration_weights().detach()
    assert (a >= 0).all() and out.logits.dtype == dtype
    fused = sum(a[i] * out.unimodal[n] for i, n in enumerate(names)) + head.bias
    torch.testing.assert_close(out.logits, fused, **tol)
    for n in names:
        w = head.unimodal_weight(n).detach()
        torch.testing.assert_close(out.unimodal[n], out.features[n] @ w.T, **tol)
        gram = w @ w.T
        if num_classes <= widths[n]:
            torch.testing.assert_close(gram, torch.eye(num_classes, dtype=dtype), **tol)
        else:
            torch.testing.assert_close(gram.diagonal(), torch.ones(num_classes, dtype=dtype), **tol)

    # loss: finite, and per-sample independent (what makes DDP equal to one process)
    per_sample = crmt_loss(out, y, rho=2.0, reduction="none")
    assert per_sample.shape == (batch,) and torch.isfinite(per_sample).all()
    torch.testing.assert_close(crmt_loss(out, y, rho=2.0), per_sample.mean(), **tol)
    for i in range(batch):
        one = CRMTOutput(out.logits[i:i + 1], {n: z[i:i + 1] for n, z in out.unimodal.items()},
                         {n: f[i:i + 1] for n, f in out.features.items()})
        torch.testing.assert_close(crmt_loss(one, y[i:i + 1], rho=2.0, reduction="none"), per_sample[i:i + 1], **tol)

    # certify: radius >= 0, exactly 0 where misclassified, per-modality >= joint, tight >= paper,
    # each sample certified alone gets the same radius
    lip = {n: data.draw(st.floats(0.1, 10.0), label=f"L {n}") for n in names}
    z64 = torch.stack([out.unimodal[n].detach().double() for n in names], dim=1)
    fused64 = torch.einsum("bmk,mk->bk", z64, a.double()) + head.bias.detach().double()
    margins = fused64.gather(1, y[:, None]) - fused64
    correct = ((margins > 0) | F.one_hot(y, num_classes).bool()).all(1)
    certs = {kind: crmt.certify(x, y, lipschitz=lip, denominator=kind) for kind in ("paper", "tight")}
    for kind, cert in certs.items():
        assert torch.equal(cert.correct, correct)
        assert torch.isfinite(cert.radius).all() and (cert.radius >= 0).all()
        assert torch.equal(cert.radius > 0, correct)
        for n in names:
            assert (cert.radius_per_modality[n] >= cert.radius * (1 - 1e-12)).all()
        for i in range(batch):
            alone = crmt.certify({n: t[i:i + 1] for n, t in x.items()}, y[i:i + 1], lipschitz=lip, denominator=kind)
            # float32 matmuls round differently for a batch of 1: equal up to that rounding
            torch.testing.assert_close(alone.radius, cert.radius[i:i + 1], **tol)
    assert (certs["tight"].radius >= certs["paper"].radius * (1 - 1e-12)).all()

    # soundness: with the encoders' exact constants (spectral norms) no radius exceeds the exact
    # distance to the decision boundary (float64: float32 margins round at ~1e-7 of the logits)
    if dtype == torch.float64:
        spectral = {n: float(torch.linalg.matrix_norm(model.encoders[n].weight.detach(), ord=2)) for n in names}
        exact = exact_distance(crmt, model, x, y)
        for kind in ("paper", "tight"):
            cert = crmt.certify(x, y, lipschitz=spectral, denominator=kind)
            assert (cert.radius <= exact * (1 + 1e-9) + 1e-12).all()
