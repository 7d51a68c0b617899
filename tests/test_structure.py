"""The late-fusion structure check, discovery of the head and modalities, sum-of-heads fusion,
output pickers and forward signatures (issue 12, items 1-4)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from crmt_plugin import CRMTError, CRMTWrapper, crmt_loss
from crmt_plugin.structure import check_concatenated, discover_widths, probe


def linear(i, o, seed):
    layer = nn.Linear(i, o).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(o, i, generator=gen, dtype=torch.float64))
        layer.bias.copy_(0.1 * torch.randn(o, generator=gen, dtype=torch.float64))
    return layer


class Concat(nn.Module):
    """Encoders concatenated in ``order`` then one fusion nn.Linear at ``head_name`` (dotted)."""

    def __init__(self, encoders, order, num_classes=4, head_name="classifier", seed=0):
        super().__init__()
        self.enc = nn.ModuleDict(encoders)
        self.order = list(order)
        width = sum(self.width(n) for n in order)
        self.head_name = head_name
        parent = self
        *path, last = head_name.split(".")
        for p in path:
            parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(last, linear(width, num_classes, seed + 99))

    def width(self, name):
        enc = self.enc[name]
        return enc.out_features if isinstance(enc, nn.Linear) else enc[0].out_features

    def forward(self, **x):
        return self.get_submodule(self.head_name)(torch.cat([self.enc[n](x[n]) for n in self.order], dim=1))


def batch(dims, n=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, d, generator=gen, dtype=torch.float64) for k, d in dims.items()}


def swapped():
    """The head concatenates [visual, audio], each 3 wide."""
    return Concat({"audio": linear(5, 3, 1), "visual": linear(4, 3, 2)}, ["visual", "audio"])


# ============================================================================ item 1: verified structure
def test_swapped_order_raises_at_wrap_time_with_example_inputs():
    x = batch({"audio": 5, "visual": 4})
    with pytest.raises(CRMTError, match=r"columns 0–2 depend on 'visual', declared 'audio'"):
        CRMTWrapper(swapped(), head="classifier", modalities={"audio": 3, "visual": 3}, example_inputs=x)


def test_swapped_order_raises_in_certify_without_example_inputs():
    model = swapped()
    crmt = CRMTWrapper(model, head="classifier", modalities={"audio": 3, "visual": 3})  # cannot check yet
    assert not crmt.structure_verified
    x = batch({"audio": 5, "visual": 4})
    with pytest.raises(CRMTError, match=r"columns 3–5 depend on 'audio', declared 'visual'"):
        crmt.certify(x, lipschitz={"audio": 10.0, "visual": 10.0})
    assert not crmt.structure_verified


def test_wrong_split_raises_with_and_without_example_inputs():
    """28 + 28 declared for a real 32 + 24."""
    def model():
        return Concat({"a": linear(6, 32, 3), "b": linear(5, 24, 4)}, ["a", "b"])
    x = batch({"a": 6, "b": 5})
    with pytest.raises(CRMTError, match=r"columns 28–31 depend on 'a', declared 'b'"):
        CRMTWrapper(model(), head="classifier", modalities={"a": 28, "b": 28}, example_inputs=x)
    crmt = CRMTWrapper(model(), head="classifier", modalities={"a": 28, "b": 28})
    with pytest.raises(CRMTError, match=r"columns 28–31 depend on 'a', declared 'b'"):
        crmt.certify(x, lipschitz={"a": 1.0, "b": 1.0})


def test_the_correct_declaration_passes_and_is_remembered():
    model = Concat({"a": linear(6, 32, 3), "b": linear(5, 24, 4)}, ["a", "b"])
    x = batch({"a": 6, "b": 5})
    crmt = CRMTWrapper(model, head="classifier", modalities={"a": 32, "b": 24}, example_inputs=x)
    assert crmt.structure_verified
    assert crmt.structure.blocks("classifier") == [(0, 32, ("a",)), (32, 56, ("b",))]
    cert = crmt.certify(x, lipschitz={"a": 10.0, "b": 10.0})
    assert cert.sound


class CrossAttention(nn.Module):
    """Features of 'a' see 'b' (a cross-modal term) before the fusion head."""

    def __init__(self):
        super().__init__()
        self.ea, self.eb, self.cross = linear(4, 3, 5), linear(3, 2, 6), linear(3, 3, 7)
        self.fc = linear(5, 3, 8)

    def forward(self, a, b):
        fa = self.ea(a) + 0.1 * torch.tanh(self.cross(b))
        return self.fc(torch.cat([fa, self.eb(b)], dim=1))


class EarlyFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = linear(7, 6, 9)
        self.fc = linear(6, 3, 10)

    def forward(self, a, b):
        return self.fc(torch.tanh(self.enc(torch.cat([a, b], dim=1))))


@pytest.mark.parametrize("model, widths", [(CrossAttention, {"a": 3, "b": 2}), (EarlyFusion, {"a": 3, "b": 3})])
def test_models_that_mix_modalities_are_refused_with_the_reason(model, widths):
    x = batch({"a": 4, "b": 3})
    with pytest.raises(CRMTError, match=r"mixes modalities before the fusion head.*depend on 'a' and 'b'"
                                        r".*certificate does not apply"):
        CRMTWrapper(model(), head="fc", modalities=widths, example_inputs=x)
    crmt = CRMTWrapper(model(), head="fc", modalities=widths)
    with pytest.raises(CRMTError, match="certificate does not apply"):
        crmt.certify(x, lipschitz={"a": 1.0, "b": 1.0})
    with pytest.raises(CRMTError, match="mixes modalities"):
        CRMTWrapper(model(), example_inputs=x)  # discovery refuses too


def test_replacing_a_submodule_invalidates_the_verdict():
    model = Concat({"a": linear(4, 3, 1), "b": linear(4, 3, 2)}, ["a", "b"])
    x = batch({"a": 4, "b": 4})
    crmt = CRMTWrapper(model, head="classifier", modalities={"a": 3, "b": 3})
    crmt.certify(x, lipschitz={"a": 1.0, "b": 1.0})
    assert crmt.structure_verified
    model.order = ["b", "a"]  # a plain attribute: not seen, documented; re-verify by hand
    with pytest.raises(CRMTError, match="depend on 'b', declared 'a'"):
        crmt.verify_structure(x)
    model.order = ["a", "b"]
    crmt.verify_structure(x)
    model.enc["a"] = linear(4, 3, 11)  # a new submodule: the verdict is stale
    assert not crmt.structure_verified
    crmt.certify(x, lipschitz={"a": 1.0, "b": 1.0})
    assert crmt.structure_verified


def test_empty_batch_certificate_is_not_sound_before_verification():
    model = Concat({"a": linear(4, 3, 1), "b": linear(4, 3, 2)}, ["a", "b"])
    crmt = CRMTWrapper(model, head="classifier", modalities={"a": 3, "b": 3})
    empty = {"a": torch.zeros(0, 4, dtype=torch.float64), "b": torch.zeros(0, 4, dtype=torch.float64)}
    assert crmt.certify(empty, lipschitz={"a": 1.0, "b": 1.0}).sound is False
    crmt.verify_structure(batch({"a": 4, "b": 4}))
    assert crmt.certify(empty, lipschitz={"a": 1.0, "b": 1.0}).sound is True


def test_probe_leaves_the_model_and_the_global_generator_untouched():
    model = Concat({"a": nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double(), "b": linear(4, 3, 2)},
                   ["a", "b"])
    model.train()
    bn = model.enc["a"][1]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    state = torch.get_rng_state()
    report = probe(model, lambda x: model(**x), {"classifier": model.classifier}, batch({"a": 4, "b": 4}))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert all(m.training for m in model.modules())
    check_concatenated(report, "classifier", {"a": 3, "b": 3})


def test_integer_inputs_are_probed_with_values_from_the_batch():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(10, 4).double()
            self.eb = linear(3, 2, 1)
            self.fc = linear(6, 3, 2)

        def forward(self, tokens, b):
            return self.fc(torch.cat([self.emb(tokens), self.eb(b)], dim=1))

    model = Tokens()
    tokens = torch.randint(0, 10, (16, 5), generator=torch.Generator().manual_seed(0))
    x = {"tokens": tokens, "b": batch({"b": 3}, 16)["b"]}
    crmt = CRMTWrapper(model, example_inputs=x)
    assert crmt.modalities == ("tokens", "b") and dict(crmt.widths) == {"tokens": 4, "b": 2}


# ============================================================================ item 2: discovery
@pytest.mark.parametrize(
    "head_name, order, dims",
    [
        ("classifier", ["audio", "visual"], {"audio": 5, "visual": 7}),
        ("out.proj", ["txt", "img", "aud"], {"img": 7, "txt": 5, "aud": 3}),
        ("fuse", ["b", "a"], {"a": 2, "b": 9}),
    ],
)
def test_discovery_finds_the_head_order_and_widths(head_name, order, dims):
    widths = {n: 2 + i for i, n in enumerate(sorted(dims))}
    encoders = {n: nn.Sequential(linear(dims[n], widths[n], i), nn.Tanh()) for i, n in enumerate(dims)}
    model = Concat(encoders, order, head_name=head_name)
    x = batch(dims)
    with torch.no_grad():
        before = model(**x)
    crmt = CRMTWrapper(model, example_inputs=x, orthonormal=False)  # unit rows: the conversion is exact
    assert crmt.head_path == head_name
    assert crmt.modalities == tuple(order)
    assert list(crmt.widths.items()) == [(n, widths[n]) for n in order]
    assert crmt.structure_verified
    crmt.eval()
    torch.testing.assert_close(crmt(x).logits, before, rtol=1e-9, atol=1e-9)
    assert crmt.certify(x, lipschitz={n: 5.0 for n in dims}).sound


def test_discovery_needs_example_inputs():
    with pytest.raises(CRMTError, match="example_inputs="):
        CRMTWrapper(swapped())
    with pytest.raises(CRMTError, match="example_inputs="):
        CRMTWrapper(swapped(), head="classifier")


def test_ambiguous_head_lists_the_candidates():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.ea, self.eb = linear(3, 2, 1), linear(3, 2, 2)
            self.fc1, self.fc2 = linear(4, 3, 3), linear(4, 3, 3)  # identical weights

        def forward(self, a, b):
            h = torch.cat([self.ea(a), self.eb(b)], dim=1)
            self.fc2(h)
            return self.fc1(h).clone()

    with pytest.raises(CRMTError, match=r"several nn.Linear layers \['fc1', 'fc2'\]"):
        CRMTWrapper(TwoHeads(), example_inputs=batch({"a": 3, "b": 3}))


def test_no_linear_output_lists_the_candidates():
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.ea, self.eb, self.fc = linear(3, 2, 1), linear(3, 2, 2), linear(4, 3, 3)

        def forward(self, a, b):
            return torch.log_softmax(self.fc(torch.cat([self.ea(a), self.eb(b)], dim=1)), dim=1)

    with pytest.raises(CRMTError, match=r"no nn.Linear produces.*with 3 outputs: \['fc \(4->3\)'\]"):
        CRMTWrapper(Softmaxed(), example_inputs=batch({"a": 3, "b": 3}))
    with pytest.raises(CRMTError, match="not the output of head 'fc'"):
        CRMTWrapper(Softmaxed(), head="fc", modalities={"a": 2, "b": 2}, example_inputs=batch({"a": 3, "b": 3}))


def test_ambiguous_split_of_constant_columns_raises():
    enc_a = linear(3, 3, 1)
    with torch.no_grad():
        enc_a.weight[2].zero_()  # the last column of 'a' is constant: a or b?
    model = Concat({"a": enc_a, "b": linear(3, 2, 2)}, ["a", "b"])
    x = batch({"a": 3, "b": 3})
    with pytest.raises(CRMTError, match=r"column 2 did not move.*between the blocks of 'a' and 'b'"):
        CRMTWrapper(model, example_inputs=x)
    crmt = CRMTWrapper(model, head="classifier", modalities={"a": 3, "b": 2}, example_inputs=x)  # declared: fine
    assert crmt.widths == {"a": 3, "b": 2}
    report = crmt.structure
    assert report.blocks("classifier") == [(0, 2, ("a",)), (2, 3, ()), (3, 5, ("b",))]
    with pytest.raises(CRMTError, match="ambiguous"):
        discover_widths(report, "classifier")


# ============================================================================ item 3: sum of heads
class SumHeads(nn.Module):
    """logits = tab_head(phi_tab) + sensor_head(phi_sensor), linear encoders."""

    def __init__(self, num_classes=4, seed=0, bias=(True, True)):
        super().__init__()
        self.tab_enc, self.sensor_enc = linear(6, 5, seed), linear(4, 3, seed + 1)
        self.tab_head = nn.Linear(5, num_classes, bias=bias[0]).double()
        self.sensor_head = nn.Linear(3, num_classes, bias=bias[1]).double()

    def forward(self, tab, sensor):
        return self.tab_head(self.tab_enc(tab)) + self.sensor_head(self.sensor_enc(sensor))


SUM_HEADS = {"tab": "tab_head", "sensor": "sensor_head"}


def sum_batch(n=64, seed=3):
    return batch({"tab": 6, "sensor": 4}, n, seed)


def exact_linear_distances(crmt, model, x, y):
    """Closed form for h = sum_m G_m x_m + c: joint / per-modality minimal l2 distances (0 if wrong)."""
    a = crmt.head.integration_weights().detach()
    enc = {"tab": model.tab_enc, "sensor": model.sensor_enc}
    jac = {n: a[i, :, None] * crmt.head.unimodal_weight(n).detach() @ enc[n].weight
           for i, n in enumerate(crmt.modalities)}
    with torch.no_grad():
        logits = crmt(x).logits
    margins = logits.gather(1, y[:, None]) - logits
    diff = {n: g[y][:, None, :] - g[None] for n, g in jac.items()}
    is_label = torch.nn.functional.one_hot(y, logits.shape[1]).bool()
    inf = torch.tensor(float("inf"), dtype=logits.dtype)
    joint = torch.where(is_label, inf, margins / torch.sqrt(sum(d.pow(2).sum(-1) for d in diff.values()))).amin(1)
    per = {n: torch.where(is_label, inf, margins / d.norm(dim=-1)).amin(1) for n, d in diff.items()}
    return joint.clamp_min(0), {n: p.clamp_min(0) for n, p in per.items()}, jac


@pytest.mark.parametrize("discover", [False, True])
def test_sum_of_heads_keeps_the_logits_and_certificates_hold_against_the_exact_attack(discover):
    model = SumHeads()
    twin = copy.deepcopy(model)
    x = sum_batch()
    with torch.no_grad():
        before = model(**x)
    crmt = CRMTWrapper(model, example_inputs=x) if discover else CRMTWrapper(model, head=SUM_HEADS)
    assert crmt.head_path == SUM_HEADS and crmt.modalities == ("tab", "sensor")
    assert crmt.widths == {"tab": 5, "sensor": 3}
    with torch.no_grad():
        after = model(**x)  # the user's model returns the CRMT head's fused logits
        out = crmt(x)
    torch.testing.assert_close(after, out.logits)
    assert not torch.allclose(after, before)  # the nearest CRMT head of a generic head; exact below
    exact_copy = CRMTWrapper(twin, head=SUM_HEADS, orthonormal=False)
    with torch.no_grad():
        torch.testing.assert_close(exact_copy(x).logits, before, rtol=1e-9, atol=1e-9)
    a = crmt.head.integration_weights()
    torch.testing.assert_close(out.logits, a[0] * out.unimodal["tab"] + a[1] * out.unimodal["sensor"] + crmt.head.bias)
    y = out.logits.argmax(1)
    spectral = {"tab": float(torch.linalg.matrix_norm(model.tab_enc.weight.detach(), ord=2)),
                "sensor": float(torch.linalg.matrix_norm(model.sensor_enc.weight.detach(), ord=2))}
    cert = crmt.certify(x, y, lipschitz=spectral)
    assert cert.sound and bool((cert.radius > 0).all())
    exact, per, jac = exact_linear_distances(crmt, model, x, y)
    assert bool((cert.radius <= exact * (1 + 1e-9)).all())
    for n in crmt.modalities:
        assert bool((cert.radius_per_modality[n] <= per[n] * (1 + 1e-9)).all())
    # the exact worst case at 0.99 x the certified radius, against every class k: never flips
    for k in range(4):
        g = {n: j[y] - j[k][None] for n, j in jac.items()}  # (B, n_m), rows of k = y are 0
        norm = torch.sqrt(sum(v.pow(2).sum(1) for v in g.values())).clamp_min(1e-300)
        adv = {n: x[n] - (0.99 * cert.radius / norm)[:, None] * g[n] for n in g}
        with torch.no_grad():
            assert torch.equal(crmt(adv).logits.argmax(1), y)


def test_sum_of_heads_trains_fits_integration_and_exports():
    torch.manual_seed(0)
    model = SumHeads(bias=(False, True))
    x = sum_batch()
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(0))
    crmt = CRMTWrapper(model, head=SUM_HEADS, example_inputs=x)
    keys = list(crmt.state_dict())
    assert "model.tab_head.head.directions.tab" in keys and not any(k.startswith("model.sensor_head.") for k in keys)
    opt = torch.optim.Adam(crmt.parameters(), lr=1e-2)
    crmt.check_optimizer(opt)
    for _ in range(5):
        loss = crmt_loss(crmt(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lip = crmt.estimate_lipschitz([(x, y)])
    assert lip.values.shape == (2, 4)
    before = {k: v.clone() for k, v in crmt.state_dict().items()}
    crmt.fit_integration([(x, y)], lipschitz=lip, epochs=3)
    changed = [k for k, v in crmt.state_dict().items() if not torch.equal(v, before[k])]
    assert all(".integration." in k for k in changed)
    crmt.eval()
    plain = crmt.export()
    assert isinstance(plain.tab_head, nn.Linear) and plain.tab_head.bias is None
    assert isinstance(plain.sensor_head, nn.Linear) and plain.sensor_head.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(plain(**x), crmt(x).logits, rtol=1e-10, atol=1e-10)
    fresh = SumHeads(bias=(False, True))
    fresh.load_state_dict(plain.state_dict(), strict=True)  # loads into the user's own, unwrapped class


def test_sum_of_heads_with_a_head_reading_the_wrong_modality_raises():
    x = sum_batch()
    with pytest.raises(CRMTError, match=r"head 'sensor_head', declared for modality 'tab', depends on \['sensor'\]"):
        CRMTWrapper(SumHeads(), head={"tab": "sensor_head", "sensor": "tab_head"}, example_inputs=x)
    crmt = CRMTWrapper(SumHeads(), head={"tab": "sensor_head", "sensor": "tab_head"})
    with pytest.raises(CRMTError, match="declared for modality 'tab'"):
        crmt.certify(x, lipschitz={"tab": 1.0, "sensor": 1.0})
    with pytest.raises(CRMTError, match="do not match the heads' in_features"):
        CRMTWrapper(SumHeads(), head=SUM_HEADS, modalities={"tab": 3, "sensor": 5})
    with pytest.raises(CRMTError, match="same nn.Linear"):
        CRMTWrapper(SumHeads(), head={"tab": "tab_head", "sensor": "tab_head"})


def test_an_averaged_sum_is_refused_at_wrap_time():
    class Averaged(SumHeads):
        def forward(self, tab, sensor):
            return 0.5 * super().forward(tab, sensor)

    with pytest.raises(CRMTError, match="not the sum of the heads"):
        CRMTWrapper(Averaged(), head=SUM_HEADS, example_inputs=sum_batch())


# ============================================================================ item 4: outputs and signatures
class TupleOut(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.ea, self.eb, self.fc = linear(3, 2, 1), linear(3, 2, 2), linear(4, 3, 3)

    def forward(self, a, b):
        feats = torch.cat([self.ea(a), self.eb(b)], dim=1)
        logits = self.fc(feats)
        if self.kind == "tuple":
            return logits, feats
        if self.kind == "dict":
            return {"features": feats, "logits": logits}
        return Output(logits=logits, features=feats)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor


@pytest.mark.parametrize("kind, output", [("tuple", 0), ("dict", "logits"), ("object", None),
                                          ("object", "logits"), ("tuple", lambda out: out[0])])
def test_models_returning_tuples_dicts_or_objects(kind, output):
    x = batch({"a": 3, "b": 3})
    crmt = CRMTWrapper(TupleOut(kind), head="fc", modalities={"a": 2, "b": 2}, output=output, example_inputs=x)
    out = crmt(x)
    assert out.logits.shape == (32, 3)
    assert crmt.certify(x, lipschitz={"a": 3.0, "b": 3.0}).sound
    discovered = CRMTWrapper(TupleOut(kind), output=output, example_inputs=x)
    assert discovered.head_path == "fc" and discovered.widths == {"a": 2, "b": 2}


@pytest.mark.parametrize("kind, message", [("tuple", r"returns a tuple of 2.*pass output=0"),
                                           ("dict", r"returns a dict with keys \['features', 'logits'\]")])
def test_unpicked_outputs_raise_a_clear_error(kind, message):
    x = batch({"a": 3, "b": 3})
    with pytest.raises(CRMTError, match=message):
        CRMTWrapper(TupleOut(kind), head="fc", modalities={"a": 2, "b": 2}, example_inputs=x)
    crmt = CRMTWrapper(TupleOut(kind), head="fc", modalities={"a": 2, "b": 2})  # no example: at the first forward
    with pytest.raises(CRMTError, match=message):
        crmt(x)
    with pytest.raises(CRMTError, match="output must be None, an int, a str or a callable"):
        CRMTWrapper(TupleOut(kind), head="fc", modalities={"a": 2, "b": 2}, output=1.5)
    with pytest.raises(CRMTError, match="picks element 5"):
        CRMTWrapper(TupleOut("tuple"), head="fc", modalities={"a": 2, "b": 2}, output=5, example_inputs=x)


def test_forward_signature_that_does_not_match_the_modalities_is_caught_at_wrap_time():
    x = {"audio": torch.randn(4, 3, dtype=torch.float64), "video": torch.randn(4, 3, dtype=torch.float64)}
    for kwargs in ({"example_inputs": x}, {}):
        with pytest.raises(CRMTError, match=r"takes no argument named \['audio', 'video'\].*call="):
            CRMTWrapper(TupleOut("tuple"), head="fc", modalities={"audio": 2, "video": 2}, output=0, **kwargs)
    renamed = {"a": x["audio"], "b": x["video"]}
    crmt = CRMTWrapper(TupleOut("tuple"), head="fc", modalities={"audio": 2, "video": 2}, output=0,
                       call=lambda m, inp: m(inp["audio"], inp["video"]), example_inputs=x)
    assert crmt(x).logits.shape == (4, 3) and set(renamed) == {"a", "b"}


def test_a_type_error_in_the_example_forward_becomes_a_crmt_error():
    class Broken(TupleOut):
        def forward(self, **x):
            return self.fc(x["a"], x["b"])  # wrong call inside: TypeError

    with pytest.raises(CRMTError, match="failed: .*takes 2 positional arguments"):
        CRMTWrapper(Broken("tuple"), head="fc", modalities={"a": 2, "b": 2}, example_inputs=batch({"a": 3, "b": 3}))
