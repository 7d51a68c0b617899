"""The shared scale (``shared_scale=True``): a = exp(g tau) softplus(alpha).

What must hold: it is off by default on a bare CRMTHead (state_dict unchanged) and on by default, with
gain 1, in CRMTWrapper; ``shared_scale=False`` gives the paper's head; with it the head is still the same fused
linear map (forward, export, certificates and step 2 all use the scaled a); step 2 changes alpha only;
under Adam the fused logit scale grows faster with it than without.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from crmt_plugin import CRMTError, CRMTWrapper, crmt_loss
from crmt_plugin.head import CRMTHead

from helpers import linear_model, trained_cnn


def test_off_by_default_and_the_state_dict_is_unchanged():
    head = CRMTHead({"audio": 5, "image": 3}, 4)
    assert head.log_scale is None
    assert "log_scale" not in head.state_dict()
    assert torch.equal(head.shared_scale_factor(), torch.ones(()))
    scaled = CRMTHead({"audio": 5, "image": 3}, 4, shared_scale=True)
    assert set(scaled.state_dict()) == set(head.state_dict()) | {"log_scale"}
    assert "shared_scale=True" in repr(scaled) and "shared_scale" not in repr(head)


def test_the_wrapper_has_it_by_default_with_gain_1_and_can_turn_it_off():
    def model():
        return linear_model({"audio": 6, "image": 4}, {"audio": 5, "image": 3}, num_classes=4)

    on = CRMTWrapper(model(), head="fusion.fc", modalities={"audio": 5, "image": 3})
    assert on.head.log_scale is not None and on.head.scale_gain == 1.0
    off = CRMTWrapper(model(), head="fusion.fc", modalities={"audio": 5, "image": 3}, shared_scale=False)
    assert off.head.log_scale is None and "fusion.fc.log_scale" not in off.model.state_dict()


@pytest.mark.parametrize("saved_with_scale", [False, True])
def test_a_checkpoint_of_the_other_kind_names_the_fix(saved_with_scale):
    def model():
        return linear_model({"audio": 6, "image": 4}, {"audio": 5, "image": 3}, num_classes=4)

    saved = CRMTWrapper(model(), head="fusion.fc", modalities={"audio": 5, "image": 3},
                        shared_scale=saved_with_scale).state_dict()
    other = CRMTWrapper(model(), head="fusion.fc", modalities={"audio": 5, "image": 3},
                        shared_scale=not saved_with_scale)
    with pytest.raises(CRMTError, match=f"shared_scale={saved_with_scale}"):
        other.load_state_dict(saved)
    same = CRMTWrapper(model(), head="fusion.fc", modalities={"audio": 5, "image": 3}, shared_scale=saved_with_scale)
    same.load_state_dict(saved)  # the matching kind loads
    torch.testing.assert_close(same.head.integration_weights(), saved_head_a(saved, saved_with_scale))


@pytest.mark.parametrize("gain", [0.0, -1.0, math.inf, True, "10"])
def test_bad_scale_gain_raises(gain):
    with pytest.raises(CRMTError, match="scale_gain"):
        CRMTHead({"audio": 5, "image": 3}, 4, shared_scale=True, scale_gain=gain)


@pytest.mark.parametrize("seed", range(3))
def test_forward_and_export_are_the_fused_linear_with_the_scaled_a(seed):
    torch.manual_seed(seed)
    model = linear_model({"audio": 6, "image": 4}, {"audio": 5, "image": 3}, num_classes=4, seed=seed)
    crmt = CRMTWrapper(model, head="fusion.fc", modalities={"audio": 5, "image": 3}, shared_scale=True,
                       scale_gain=3.0)
    head = crmt.head
    with torch.no_grad():
        head.log_scale.fill_(0.4)
    x = {"audio": torch.randn(7, 6, dtype=torch.float64), "image": torch.randn(7, 4, dtype=torch.float64)}
    out = crmt(x)
    scale = math.exp(3.0 * 0.4)
    expected = head.bias.detach().clone()
    for i, name in enumerate(head.modalities):
        alpha_a = F.softplus(head.integration[name].detach())
        expected = expected + scale * alpha_a * out.unimodal[name]
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(crmt.export()(**x), out.logits)


def test_gradient_reaches_the_shared_scale_and_check_optimizer_wants_it():
    crmt, data = trained_cnn(steps=0, shared_scale=True)
    inputs, y = data[0]
    crmt_loss(crmt(inputs), y).backward()
    assert crmt.head.log_scale.grad is not None and crmt.head.log_scale.grad.abs() > 0
    others = [p for n, p in crmt.named_parameters() if not n.endswith("log_scale")]
    with pytest.raises(CRMTError, match="log_scale"):
        crmt.check_optimizer(torch.optim.Adam(others))
    crmt.check_optimizer(torch.optim.Adam(crmt.parameters()))


def fold(crmt):
    """The same function with the scale moved into alpha (tau = 0)."""
    head = crmt.head
    with torch.no_grad():
        a = head.integration_weights().detach()
        head.log_scale.zero_()
        for i, name in enumerate(head.modalities):
            head.integration[name].copy_(a[i] + torch.log(-torch.expm1(-a[i])))


def test_certificates_and_step_2_see_the_scaled_a():
    crmt, data = trained_cnn(steps=10, shared_scale=True)
    with torch.no_grad():
        crmt.head.log_scale.fill_(0.15)  # a x e^1.5
    crmt.eval()
    lip = crmt.estimate_lipschitz(data)
    radius = torch.cat([crmt.certify(x, y, lipschitz=lip).radius for x, y in data])
    folded, _ = trained_cnn(steps=10, shared_scale=True)
    folded.load_state_dict(crmt.state_dict())
    fold(folded)
    folded.eval()
    radius_folded = torch.cat([folded.certify(x, y, lipschitz=lip).radius for x, y in data])
    torch.testing.assert_close(radius, radius_folded, rtol=1e-5, atol=1e-7)

    before = {k: v.clone() for k, v in crmt.state_dict().items()}
    runs = []
    for wrapped in (crmt, folded):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs.append(wrapped.fit_integration(data, lipschitz=lip, epochs=5, lr=5e-2, accuracy_tolerance=math.inf,
                                                generator=torch.Generator().manual_seed(0)))
    assert runs[0].mean_radius_before == pytest.approx(runs[1].mean_radius_before, rel=1e-6)
    assert runs[0].mean_radius_after > runs[0].mean_radius_before
    changed = [k for k in before if not torch.equal(before[k], crmt.state_dict()[k])]
    assert changed and all(".integration." in k for k in changed), changed  # tau stays
    after = torch.cat([crmt.certify(x, y, lipschitz=lip).radius for x, y in data]).mean()
    assert float(after) == pytest.approx(runs[0].mean_radius_after, rel=1e-4)


def fused_logit_std(shared_scale, steps=300, seed=0, **scale):
    """Adam (lr 1e-3) on a learnable 2-modality problem; the std over classes of the fused logits after it."""
    crmt, data = trained_cnn(steps=steps, seed=seed, lr=1e-3, shared_scale=shared_scale, **scale)
    crmt.eval()
    with torch.no_grad():
        return float(torch.cat([crmt(x).logits for x, _ in data]).std(1).mean())


def test_under_adam_the_fused_logits_grow_faster_with_the_shared_scale_and_faster_with_its_gain():
    # measured (seed 0): 0.52 without the scale, 0.66 with the default gain 1, 2.66 with gain 10 after 300 steps
    plain, default, fast = fused_logit_std(False), fused_logit_std(True), fused_logit_std(True, scale_gain=10.0)
    assert plain < default < fast and fast > 2.5 * plain, (plain, default, fast)


def saved_head_a(state, with_scale):
    """a of the saved head, from its state_dict: softplus(alpha), times exp(tau) with the scale (gain 1)."""
    a = F.softplus(torch.stack([state[f"model.fusion.fc.integration.{m}"] for m in ("audio", "image")]))
    return a * torch.exp(state["model.fusion.fc.log_scale"]) if with_scale else a


class TwoHeads(torch.nn.Module):
    """logits = audio_head(audio) + image_head(image): a sum of per-modality heads."""

    def __init__(self):
        super().__init__()
        self.audio_head = torch.nn.Linear(5, 4).double()
        self.image_head = torch.nn.Linear(3, 4).double()

    def forward(self, audio, image):
        return self.audio_head(audio) + self.image_head(image)


def test_sum_of_heads_carries_the_shared_scale_into_the_export():
    torch.manual_seed(0)
    crmt = CRMTWrapper(TwoHeads(), head={"audio": "audio_head", "image": "image_head"}, shared_scale=True)
    assert sum(n.endswith("log_scale") for n, _ in crmt.named_parameters()) == 1  # held once, by the owner
    with torch.no_grad():
        crmt.head.log_scale.fill_(-0.07)
    x = {"audio": torch.randn(6, 5, dtype=torch.float64), "image": torch.randn(6, 3, dtype=torch.float64)}
    logits = crmt(x).logits
    torch.testing.assert_close(crmt.model(**x), logits)
    torch.testing.assert_close(crmt.export()(**x), logits)
