"""Tests of crmt_plugin.evaluation: the runner's numbers, certified rows, tables, plot, diagnostics."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from crmt_plugin import CRMTError, CRMTWrapper, LipschitzConstants
from crmt_plugin.attacks import FGM, PGD, drop_modality, modality_means
from crmt_plugin.evaluation import ModalityReport, RobustnessResult, evaluate_robustness, modality_report

from conftest import cnn_batch, cnn_model, linear_model


def loader_of(batches=3, size=16, seed=0):
    return [cnn_batch(size, 5, seed=seed + s) for s in range(batches)]


def accuracy(model, batches, transform=lambda x, y: x):
    correct = n = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(**transform(x, y)).argmax(1) == y).sum())
            n += len(y)
    return correct / n


def test_runner_numbers_match_direct_computation():
    model = cnn_model().eval()
    data = loader_of()
    means = modality_means(data)
    result = evaluate_robustness(model, data, [FGM(1.0)], radii=[0.0, 0.5, 2.0], fill=means)
    assert isinstance(result, RobustnessResult) and result.modalities == ("audio", "image")
    assert result.clean_accuracy == accuracy(model, data)
    for subset in (("audio",), ("image",), ("audio", "image")):
        for r in (0.0, 0.5, 2.0):
            attack = FGM(r, modalities=subset)
            expected = accuracy(model, data, lambda x, y: attack(model, x, y))
            assert result.accuracy("FGM-l2", subset, r) == expected
        assert result.accuracy("FGM-l2", subset, 0.0) == result.clean_accuracy
    for m in ("audio", "image"):
        zeros = result.select(attack="missing (zeros)", modalities=m)[0]
        assert zeros["accuracy"] == accuracy(model, data, lambda x, y: drop_modality(x, m))
        filled = result.select(attack="missing (fill)", modalities=m)[0]
        assert filled["accuracy"] == accuracy(model, data, lambda x, y: drop_modality(x, m, fill=means))
        assert math.isnan(zeros["radius"]) and zeros["n"] == 48
    assert all(r["n"] == 48 for r in result.rows)


def test_runner_restores_mode_and_is_reproducible():
    model = cnn_model()
    model.train()
    model.encoders["image"][1].eval()
    flags = [m.training for m in model.modules()]
    data = loader_of(2)
    runs = [evaluate_robustness(model, data, [PGD(1.0, steps=3, restarts=2)], radii=[1.0], seed=3) for _ in range(2)]
    assert [m.training for m in model.modules()] == flags
    assert runs[0].rows == runs[1].rows
    pgd = [r for r in runs[0].rows if r["attack"] == "PGD-l2"]
    assert len(pgd) == 3 and all(r["accuracy"] <= runs[0].clean_accuracy for r in pgd)


def test_template_settings_kept_and_subsets():
    model = cnn_model().eval()
    data = loader_of(1)
    result = evaluate_robustness(
        model, data, {"pgd-linf": PGD(0.1, norm="linf", steps=2), "fgm-audio": FGM(0.3, modalities="audio")},
        missing=False,
    )
    labels = {(r["attack"], r["modalities"], r["radius"]) for r in result.rows}
    assert ("fgm-audio", "audio", 0.3) in labels and ("pgd-linf", "audio+image", 0.1) in labels
    assert not any(r["attack"] == "fgm-audio" and r["modalities"] != "audio" for r in result.rows)
    only = evaluate_robustness(model, data, [FGM(0.3)], radii=[0.3], subsets=["image"], missing=False)
    assert {r["modalities"] for r in only.rows if r["attack"] == "FGM-l2"} == {"image"}
    per_modality = evaluate_robustness(model, data, [PGD({"audio": 0.2, "image": 0.5}, steps=2)], missing=False)
    assert per_modality.select(attack="PGD-l2")[0]["modalities"] == "audio+image"


def sound_linear_crmt():
    model = linear_model({"a": 6, "b": 9}, {"a": 8, "b": 8}, num_classes=4, seed=1)
    lip = LipschitzConstants.declared(
        {n: torch.linalg.matrix_norm(model.encoders[n].weight, ord=2).item() * (1 + 1e-9) for n in ("a", "b")}
    )
    crmt = CRMTWrapper(model, head="fusion.fc", modalities=model.widths)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        x = {"a": torch.randn(32, 6, generator=g, dtype=torch.float64),
             "b": torch.randn(32, 9, generator=g, dtype=torch.float64)}  # fmt: skip
        with torch.no_grad():
            logits = crmt(x).logits
        noise = torch.randint(0, 4, (32,), generator=g)
        y = torch.where(torch.rand(32, generator=g) < 0.8, logits.argmax(1), noise)
        data.append((x, y))
    return crmt, lip, data


def test_certified_rows_sound_and_below_attacks():
    crmt, lip, data = sound_linear_crmt()
    radii = [0.0, 0.2, 0.5, 1.0]
    result = evaluate_robustness(crmt, data, [PGD(1.0, steps=20, restarts=2)], radii=radii, lipschitz=lip)
    cert_rows = result.select(attack="certified")
    assert len(cert_rows) == 3 * len(radii) and all(r["sound"] is True for r in cert_rows)
    assert all(r["sound"] is None for r in result.rows if r["attack"] != "certified")
    for r in radii:
        for subset in ("a", "b", "a+b"):
            certified = result.accuracy("certified", subset, r)
            attacked = result.accuracy("PGD-l2", subset, r)
            assert certified <= attacked + 1e-12, (subset, r, certified, attacked)  # a sound bound holds
    assert result.accuracy("certified", "a+b", 0.0) == result.clean_accuracy  # misclassified never count
    # the numbers are the certificate's: correct and radius >= r
    certs = [crmt.certify(x, y, lipschitz=lip) for x, y in data]
    expected = sum(int((c.correct & (c.radius_per_modality["b"] >= 0.5)).sum()) for c in certs) / 64
    assert result.accuracy("certified", "b", 0.5) == expected
    assert result.accuracy("certified", "a+b", 1.0) < result.accuracy("certified", "a+b", 0.0)

    empirical = evaluate_robustness(crmt, data, None, radii=[0.5], lipschitz=crmt.estimate_lipschitz(data),
                                    certified_radii=[0.1, 0.3])  # fmt: skip
    assert all(r["sound"] is False for r in empirical.select(attack="certified"))
    assert {r["radius"] for r in empirical.select(attack="certified")} == {0.1, 0.3}
    assert "(empirical)" in empirical.table(pivot=True)


def test_tables_text_and_markdown():
    model = cnn_model().eval()
    result = evaluate_robustness(model, loader_of(1), [FGM(1.0)], radii=[0.5, 1.0])
    text = result.table()
    assert text == str(result)
    header = text.splitlines()[0].split()
    assert header[:4] == ["attack", "modalities", "radius", "accuracy"]
    assert len(text.splitlines()) == 2 + len(result.rows)
    md = result.table("markdown", pivot=True)
    lines = md.splitlines()
    assert lines[0] == "| attack | modalities | 0.5 | 1 |" and lines[1].startswith("|---")
    fgm_audio = f"| FGM-l2 | audio | {100 * result.accuracy('FGM-l2', 'audio', 0.5):.1f} |"
    assert any(line.startswith(fgm_audio) for line in lines)
    assert "missing (zeros)" in md
    with pytest.raises(CRMTError, match="fmt"):
        result.table("html")


def test_plot_writes_png(tmp_path):
    model = cnn_model().eval()
    result = evaluate_robustness(model, loader_of(1), [FGM(1.0), PGD(1.0, steps=2)], radii=[0.0, 0.5, 1.0])
    path = result.plot(tmp_path / "acc.png", title="test")
    data = (tmp_path / "acc.png").read_bytes()
    assert path.endswith("acc.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    empty = evaluate_robustness(model, loader_of(1))
    with pytest.raises(CRMTError, match="nothing to plot"):
        empty.plot(tmp_path / "none.png")


def test_progress_bar_optional(monkeypatch, capsys):
    model = cnn_model().eval()
    data = loader_of(2)
    with_bar = evaluate_robustness(model, data, [FGM(0.5)], radii=[0.5], progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import now fails
    with pytest.warns(UserWarning, match="tqdm"):
        without = evaluate_robustness(model, data, [FGM(0.5)], radii=[0.5], progress=True)
    assert with_bar.rows == without.rows
    assert capsys.readouterr().out == ""  # the library prints nothing


def test_runner_errors():
    model = cnn_model().eval()
    data = loader_of(1)
    with pytest.raises(CRMTError, match="certify"):
        evaluate_robustness(model, data, lipschitz={"audio": 1.0, "image": 1.0})
    with pytest.raises(CRMTError, match="per-modality budgets"):
        evaluate_robustness(model, data, [PGD({"audio": 0.1})], radii=[0.5])
    with pytest.raises(CRMTError, match="no batches"):
        evaluate_robustness(model, [], [FGM(0.1)])
    with pytest.raises(CRMTError, match="share the label"):
        evaluate_robustness(model, data, [FGM(0.1), FGM(0.2)])
    with pytest.raises(CRMTError, match="not in the inputs"):
        evaluate_robustness(model, data, [FGM(0.1)], subsets=["video"])
    with pytest.raises(CRMTError, match="inputs_dict, y"):
        evaluate_robustness(model, [torch.zeros(3)], [FGM(0.1)])
    result = evaluate_robustness(model, data, [FGM(0.1)], radii=[0.1])
    with pytest.raises(CRMTError, match="no row"):
        result.accuracy("PGD-l2", "audio", 0.1)


class Lopsided(nn.Module):
    """A plain model that leans on 'a': logits = 5 A x_a + 0.2 B x_b."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return 5 * self.a(x["a"]) + 0.2 * self.b(x["b"])


def test_modality_report_names_preferred_and_weak_spot():
    model = Lopsided()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        x = {"a": torch.randn(64, 6, generator=g), "b": torch.randn(64, 6, generator=g)}
        with torch.no_grad():
            data.append((x, model(x).argmax(1)))
    report = modality_report(model, data, radius=0.3, attack="fast")
    assert isinstance(report, ModalityReport)
    assert report.preferred == "a" and report.weak_spot == "a"
    pm = report.per_modality
    assert pm["a"]["missing_accuracy"] < pm["b"]["missing_accuracy"]
    assert pm["a"]["attack_accuracy"] < pm["b"]["attack_accuracy"]
    assert pm["a"]["unimodal_margin"] is None and pm["a"]["integration_weight"] is None  # plain model
    assert report.clean_accuracy == 1.0 and report.n == 128
    text = str(report)
    assert "Preferred modality: a" in text and "Weak spot: a" in text and "a zeroed" in text
    # with a fill for every modality, absence means the fill: a destructive fill of 'b' flips the verdict
    filled = modality_report(model, data, radius=0.3, attack="fast", fill={"a": 0.0, "b": 100.0})
    pm = filled.per_modality
    assert pm["b"]["missing_fill_accuracy"] < pm["a"]["missing_fill_accuracy"] < pm["b"]["missing_accuracy"]
    assert filled.preferred == "b" and "b filled" in filled.summary()
    # a fill not given for every modality: zeros decide
    partial = modality_report(model, data, radius=0.3, attack="fast", fill={"b": 100.0})
    assert partial.preferred == "a"


def test_modality_report_on_crmt_wrapper():
    crmt, lip, data = sound_linear_crmt()
    report = modality_report(crmt, data, radius=0.5, attack="fast", lipschitz=lip, fill=modality_means(data))
    a = crmt.integration_weights()
    for m in ("a", "b"):
        values = report.per_modality[m]
        assert values["integration_weight"] == pytest.approx(float(a[m].double().mean()))
        assert values["unimodal_margin"] is not None and values["missing_fill_accuracy"] is not None
        certs = [crmt.certify(x, y, lipschitz=lip) for x, y in data]
        mean_radius = sum(float(c.radius_per_modality[m].sum()) for c in certs) / 64
        assert values["certified_radius"] == pytest.approx(mean_radius)
        margins = []
        with torch.no_grad():
            for x, y in data:
                z = crmt(x).unimodal[m]
                margins.append(z.gather(1, y[:, None])[:, 0] - z.scatter(1, y[:, None], -math.inf).amax(1))
        assert values["unimodal_margin"] == pytest.approx(float(torch.cat(margins).mean()))
    assert report.sound is True
    assert report.preferred in ("a", "b") and "Smallest uni-modal margin" in report.summary()
    assert "integration_weight" in report.table("markdown").splitlines()[0]
