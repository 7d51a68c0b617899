"""Certificates against closed-form oracles, Lipschitz estimation, and step 2."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from crmt_plugin import CRMTError, CRMTWrapper, LipschitzConstants
from crmt_plugin.lipschitz import _unimodal_input_gradient_norms

from conftest import cnn_batch, cnn_model, linear_model
from helpers import trained_cnn


def linear_setup(num_modalities, num_classes, in_dim, width, seed, batch=16):
    names = ["a", "b", "c"][:num_modalities]
    in_dims = {n: in_dim + i for i, n in enumerate(names)}
    widths = {n: width + i for i, n in enumerate(names)}
    model = linear_model(in_dims, widths, num_classes, seed=seed)
    crmt = CRMTWrapper(model, head="fusion.fc", modalities=widths)
    with torch.no_grad():  # arbitrary non-negative a
        gen = torch.Generator().manual_seed(seed + 1)
        for n in names:
            crmt.head.integration[n].copy_(torch.randn(num_classes, generator=gen, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed + 2)
    inputs = {n: torch.randn(batch, in_dims[n], generator=gen, dtype=torch.float64) for n in names}
    y = crmt(inputs).logits.argmax(1)  # mostly correct samples, plus a few relabelled wrong ones
    y[:3] = (y[:3] + 1) % num_classes
    return crmt, model, inputs, y


def exact_distances(crmt, model, inputs, y):
    """Closed form for a linear model h = sum_m G_m x_m + c: joint and per-modality minimal l2
    distances to a change of prediction, min_k m_k / ||G_y - G_k|| (0 if already wrong)."""
    head = crmt.head
    a = head.integration_weights()
    jac = {n: a[i, :, None] * head.unimodal_weight(n) @ model.encoders[n].weight
           for i, n in enumerate(crmt.modalities)}  # (K, n_m)
    logits = crmt(inputs).logits
    margins = logits.gather(1, y[:, None]) - logits  # (B, K)
    diff = {n: g[y][:, None, :] - g[None, :, :] for n, g in jac.items()}  # (B, K, n_m)
    is_label = torch.nn.functional.one_hot(y, logits.shape[1]).bool()
    inf = torch.tensor(float("inf"), dtype=logits.dtype)
    joint_norm = torch.sqrt(sum(d.pow(2).sum(-1) for d in diff.values()))
    joint = torch.where(is_label, inf, margins / joint_norm).amin(1).clamp_min(0)
    per = {n: torch.where(is_label, inf, margins / d.norm(dim=-1)).amin(1).clamp_min(0) for n, d in diff.items()}
    return joint.detach(), {n: p.detach() for n, p in per.items()}


@given(num_modalities=st.sampled_from([2, 3]), num_classes=st.integers(2, 6), in_dim=st.integers(1, 6),
       width=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_certificate_never_exceeds_exact_minimal_distance(num_modalities, num_classes, in_dim, width, seed):
    crmt, model, inputs, y = linear_setup(num_modalities, num_classes, in_dim, width, seed)
    exact_joint, exact_per = exact_distances(crmt, model, inputs, y)
    spectral = {n: float(torch.linalg.matrix_norm(model.encoders[n].weight.detach(), ord=2)) for n in crmt.modalities}
    per_class = torch.stack([
        torch.linalg.vector_norm(crmt.head.unimodal_weight(n) @ model.encoders[n].weight, dim=1)
        for n in crmt.modalities]).detach()
    constants = [
        (LipschitzConstants.declared(spectral), "tight"),
        (LipschitzConstants.declared(spectral), "paper"),
        (LipschitzConstants(per_class, crmt.modalities, sound=True, source="declared"), "paper"),
    ]
    slack = 1 + 1e-9
    for lip, kind in constants:
        cert = crmt.certify(inputs, y, lipschitz=lip, denominator=kind)
        assert cert.sound and cert.denominator == kind
        assert (cert.radius <= exact_joint * slack + 1e-12).all()
        for n in crmt.modalities:
            assert (cert.radius_per_modality[n] <= exact_per[n] * slack + 1e-12).all()
        assert torch.equal(cert.radius[~cert.correct], torch.zeros_like(cert.radius[~cert.correct]))
        assert (cert.radius[cert.correct] > 0).all()
    tight = crmt.certify(inputs, y, lipschitz=constants[0][0], denominator="tight").radius
    paper = crmt.certify(inputs, y, lipschitz=constants[0][0], denominator="paper").radius
    assert (tight >= paper * (1 - 1e-12)).all()


def test_tight_certificate_is_exact_for_one_dimensional_orthonormal_encoders():
    """phi^(m) = identity on R^d: the tight bound equals the exact distance."""
    crmt, model, inputs, y = linear_setup(2, 3, 4, 4, seed=5)
    with torch.no_grad():
        for n in crmt.modalities:
            enc = model.encoders[n]
            enc.weight.copy_(torch.eye(*enc.weight.shape, dtype=enc.weight.dtype))
    exact_joint, _ = exact_distances(crmt, model, inputs, y)
    cert = crmt.certify(inputs, y, lipschitz={"a": 1.0, "b": 1.0})
    torch.testing.assert_close(cert.radius, exact_joint, rtol=1e-9, atol=1e-12)


def test_min_runs_over_all_classes_not_only_the_runner_up():
    """A class that is not the runner-up but has a much larger tau is the binding one."""
    crmt, model, inputs, y = linear_setup(2, 4, 3, 5, seed=11)
    z = torch.stack([crmt(inputs).unimodal[n] for n in crmt.modalities], 1)
    logits = crmt(inputs).logits
    tau = torch.ones(2, 4, dtype=torch.float64)
    runner_up = logits.clone().scatter_(1, y[:, None], -float("inf")).argmax(1)
    # make the class ranked last the one with a huge constant for sample 5
    last = logits[5].argmin()
    tau[:, last] = 1e3
    lip = LipschitzConstants(tau, crmt.modalities, sound=False, source="empirical")
    cert = crmt.certify(inputs, y, lipschitz=lip)
    a = crmt.head.integration_weights()
    m = logits[5, y[5]] - logits[5]
    d = torch.sqrt(((a[:, y[5]] * tau[:, y[5]])[:, None] + a * tau).pow(2).sum(0))
    only_runner_up = m[runner_up[5]] / d[runner_up[5]]
    assert cert.correct[5] and cert.radius[5] < only_runner_up
    assert z.shape == (16, 2, 4)


def test_empirical_estimate_is_exact_for_linear_encoders_and_says_it_is_empirical():
    crmt, model, inputs, y = linear_setup(3, 5, 4, 6, seed=2)
    lip = crmt.estimate_lipschitz([(inputs, y)])
    expected = torch.stack([
        torch.linalg.vector_norm(crmt.head.unimodal_weight(n) @ model.encoders[n].weight, dim=1)
        for n in crmt.modalities]).detach()
    torch.testing.assert_close(lip.values, expected, rtol=1e-10, atol=1e-12)
    assert lip.sound is False and lip.source == "empirical" and lip.per_class
    assert crmt.certify(inputs, y, lipschitz=lip).sound is False


def test_vectorised_gradients_equal_one_backward_per_class():
    model = cnn_model(num_classes=6, seed=4)
    crmt = CRMTWrapper(model, head="fusion.fc", modalities=model.widths).eval()
    inputs, _ = cnn_batch(batch=10, num_classes=6)
    fast = _unimodal_input_gradient_norms(lambda x: crmt(x).unimodal, inputs, 6)
    looped = _unimodal_input_gradient_norms(lambda x: crmt(x).unimodal, inputs, 6, vectorize=False)
    torch.testing.assert_close(fast, looped, rtol=1e-6, atol=1e-8)
    slow = torch.zeros(2, 6, dtype=torch.float64)
    for i, name in enumerate(crmt.modalities):
        for k in range(6):
            x = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
            z = crmt(x).unimodal[name][:, k].sum()
            g, = torch.autograd.grad(z, x[name])
            slow[i, k] = g.flatten(1).double().norm(dim=1).max()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)


def test_bad_lipschitz_constants_raise():
    crmt, _, inputs, y = linear_setup(2, 3, 2, 3, seed=0)
    with pytest.raises(CRMTError, match=r"shape \(M,\) or \(M, K\)"):
        crmt.certify(inputs, y, lipschitz=LipschitzConstants(torch.ones(3), ("a", "b"), True, "declared"))
    with pytest.raises(CRMTError, match=">= 0"):
        crmt.certify(inputs, y, lipschitz={"a": -1.0, "b": 1.0})
    with pytest.raises(CRMTError, match="K = 4 classes"):
        crmt.certify(inputs, y, lipschitz=LipschitzConstants(torch.ones(2, 4), ("a", "b"), True, "declared"))
    with pytest.raises(CRMTError, match="modalities"):
        crmt.certify(inputs, y, lipschitz={"a": 1.0, "x": 1.0})
    with pytest.raises(CRMTError, match="tight"):
        crmt.certify(inputs, y, lipschitz=LipschitzConstants(torch.ones(2, 3), ("a", "b"), True, "declared"),
                     denominator="tight")
    with pytest.raises(CRMTError, match="finite"):
        LipschitzConstants(torch.tensor([1.0, float("inf")]), ("a", "b"), True, "declared")
    with pytest.raises(CRMTError, match="outside"):
        crmt.certify(inputs, torch.full_like(y, 7), lipschitz={"a": 1.0, "b": 1.0})


def test_certified_accuracy_curve():
    crmt, _, inputs, y = linear_setup(2, 3, 3, 4, seed=1)
    cert = crmt.certify(inputs, y, lipschitz={"a": 2.0, "b": 2.0})
    curve = cert.certified_accuracy([0.0, 1e-3, 1e9])
    assert not cert.correct.all()  # the batch holds misclassified samples: never certified
    assert curve[0] == cert.correct.double().mean()
    assert curve[0] >= curve[1] >= curve[2] == 0




# step-2 tests (fit_integration) live in tests/test_integration.py


def test_step_two_refuses_nan_logits():
    crmt, data = trained_cnn(steps=1)
    inputs, y = data[0]
    inputs = {**inputs, "audio": inputs["audio"].clone()}
    inputs["audio"][0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in crmt.state_dict().items()}
    with pytest.raises(CRMTError, match="non-finite"):
        crmt.fit_integration([(inputs, y)], lipschitz={"audio": 1.0, "image": 1.0})
    with pytest.raises(CRMTError, match="non-finite"):
        crmt.certify(inputs, y, lipschitz={"audio": 1.0, "image": 1.0})
    with pytest.raises(CRMTError, match="non-finite"):
        crmt.estimate_lipschitz([(inputs, y)])
    assert all(torch.equal(before[k], v) for k, v in crmt.state_dict().items())


def test_loader_layout_errors_and_prepare_batch():
    crmt, data = trained_cnn(steps=1)
    with pytest.raises(CRMTError, match="prepare_batch"):
        crmt.estimate_lipschitz([data[0][0]])
    flat = [{"x": x, "label": y} for x, y in data]
    lip = crmt.estimate_lipschitz(flat, prepare_batch=lambda b: (b["x"], b["label"]))
    assert lip.values.shape == (2, 5)
    with pytest.raises(CRMTError, match="empty"):
        crmt.estimate_lipschitz([])


# ============================================================================ per-modality budgets
def exact_budget_margins(crmt, model, inputs, y):
    """Linear encoders: the exact worst case under per-modality budgets eps_m against class k is
    m_k - sum_m eps_m ||G_y^(m) - G_k^(m)||; returns margins (B, K), norms (B, M, K), jacobians."""
    head = crmt.head
    a = head.integration_weights()
    jac = {n: (a[i, :, None] * head.unimodal_weight(n) @ model.encoders[n].weight).detach()
           for i, n in enumerate(crmt.modalities)}
    with torch.no_grad():
        logits = crmt(inputs).logits
    margins = logits.gather(1, y[:, None]) - logits
    norms = torch.stack([(g[y][:, None, :] - g[None]).norm(dim=-1) for g in jac.values()], dim=1)
    return margins, norms, jac


@given(num_modalities=st.sampled_from([2, 3]), num_classes=st.integers(2, 5), width=st.integers(1, 6),
       seed=st.integers(0, 10_000), data=st.data())
def test_per_modality_budgets_are_never_violated_by_the_exact_worst_case(num_modalities, num_classes, width, seed,
                                                                         data):
    crmt, model, inputs, y = linear_setup(num_modalities, num_classes, 3, width, seed)
    spectral = {n: float(torch.linalg.matrix_norm(model.encoders[n].weight.detach(), ord=2)) for n in crmt.modalities}
    kind = data.draw(st.sampled_from(["tight", "paper"]))
    cert = crmt.certify(inputs, y, lipschitz=spectral, denominator=kind)
    assert cert.margins.shape == (16, num_classes) and cert.denominators.shape == (16, num_modalities, num_classes)
    scale = float(cert.radius_per_modality[crmt.modalities[0]][cert.correct].median()) if cert.correct.any() else 1.0
    eps = {n: data.draw(st.floats(0, 2)) * scale for n in crmt.modalities}
    certified = cert.certified(eps)
    margins, norms, jac = exact_budget_margins(crmt, model, inputs, y)
    budgets = torch.tensor([eps[n] for n in crmt.modalities], dtype=torch.float64)
    worst = margins - torch.einsum("bmk,m->bk", norms, budgets)  # exact worst-case margin per class
    is_label = torch.nn.functional.one_hot(y, num_classes).bool()
    exact = cert.correct & torch.where(is_label, torch.ones_like(worst), worst).gt(-1e-9).all(1)
    assert bool((~certified | exact).all())  # certified => provably safe
    for n in crmt.modalities:  # one budget, the others 0: exactly the per-modality radius
        r = cert.radius_per_modality[n]
        others = {m: 0.0 for m in crmt.modalities if m != n}
        finite = torch.isfinite(r)
        assert torch.equal(cert.certified({n: torch.where(finite, r * (1 - 1e-9), 0.0), **others}), cert.correct)
        assert not bool((cert.certified({n: torch.where(finite, r * (1 + 1e-9), 0.0), **others}) & finite).any())
    # and the explicit worst-case perturbation against every class keeps the prediction
    for k in range(num_classes):
        adv = {}
        for i, n in enumerate(crmt.modalities):
            g = jac[n][y] - jac[n][k][None]
            adv[n] = inputs[n] - eps[n] * g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        with torch.no_grad():
            logits = crmt(adv).logits
        kept = (logits.gather(1, y[:, None]) - logits >= -1e-9 * (1 + logits.abs())).all(1)
        assert bool(kept[certified].all())


def test_per_modality_budgets_reduce_to_the_radii():
    crmt, model, inputs, y = linear_setup(3, 4, 3, 5, seed=7)
    cert = crmt.certify(inputs, y, lipschitz={"a": 2.0, "b": 1.0, "c": 3.0})
    assert torch.equal(cert.certified({}), cert.correct)  # no budget: exactly the correct samples
    for n in crmt.modalities:
        r = cert.radius_per_modality[n]
        below, above = cert.certified({n: r * (1 - 1e-9)}), cert.certified({n: r * (1 + 1e-9)})
        assert torch.equal(below, cert.correct) and not above.any()
        zeros = {m: 0.0 for m in crmt.modalities if m != n}
        assert torch.equal(cert.certified({n: r * (1 - 1e-9), **zeros}), cert.correct)
    # the joint ball lies inside the region: any budgets with l2 norm < radius are certified
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        direction = torch.rand(3, generator=gen, dtype=torch.float64)
        direction = direction / direction.norm()
        eps = {n: cert.radius * (1 - 1e-9) * direction[i] for i, n in enumerate(crmt.modalities)}
        assert torch.equal(cert.certified(eps), cert.correct)
    with pytest.raises(CRMTError, match=r"\['x'\]"):
        cert.certified({"x": 1.0})
    with pytest.raises(CRMTError, match=">= 0"):
        cert.certified({"a": -1.0})
    with pytest.raises(CRMTError, match="must map modality name -> budget"):
        cert.certified(0.5)


def test_frontier_bounds_the_region_and_plots():
    crmt, model, inputs, y = linear_setup(3, 4, 3, 5, seed=7)
    cert = crmt.certify(inputs, y, lipschitz={"a": 2.0, "b": 1.0, "c": 3.0})
    i = int(cert.correct.nonzero()[0])
    ex, ey = cert.frontier(i, ("a", "b"), steps=21)
    assert ex.shape == ey.shape == (21,) and float(ex[0]) == 0
    torch.testing.assert_close(ex[-1], cert.radius_per_modality["a"][i], rtol=1e-9, atol=0)
    torch.testing.assert_close(ey[0], cert.radius_per_modality["b"][i], rtol=1e-9, atol=0)
    assert bool((ey[1:] <= ey[:-1] + 1e-12).all())  # a frontier falls
    one = lambda v: torch.tensor([float(v)] * len(y), dtype=torch.float64)  # noqa: E731
    for x_, y_ in zip(ex[:-1].tolist(), ey[:-1].tolist()):
        assert bool(cert.certified({"a": one(x_), "b": one(y_ * (1 - 1e-6))})[i])
        assert not bool(cert.certified({"a": one(x_), "b": one(y_ * (1 + 1e-6) + 1e-12)})[i])
    fixed_x, fixed_y = cert.frontier(i, ("a", "b"), others={"c": float(cert.radius_per_modality["c"][i]) / 2})
    assert float(fixed_x[-1]) < float(ex[-1])  # a budget on c shrinks the region
    wrong = int((~cert.correct).nonzero()[0])
    assert cert.frontier(wrong, ("a", "b"))[0].numel() == 0
    matplotlib = pytest.importorskip("matplotlib", reason="the plot needs the optional matplotlib "
                                     "(pip install matplotlib; scripts/install.sh installs it)")
    matplotlib.use("Agg")
    ax = cert.plot_region(i, ("a", "b"))
    assert ax.get_xlabel().startswith("budget of a") and len(ax.lines) >= 3
    import matplotlib.pyplot as plt
    plt.close("all")
