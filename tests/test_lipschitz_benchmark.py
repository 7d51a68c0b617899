"""crmt-benchmark's lip-jt / crmt-lip: the same Lipschitz encoders, sound constants with no declaration, the sound
columns and region in results.json / results.md, and no attack inside a sound radius (check_certificates)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crmt_plugin.benchmark import cli
from crmt_plugin.benchmark.data import batch_list, load_npz
from crmt_plugin.benchmark.evaluate import certifiable_copy
from crmt_plugin.benchmark.lipschitz_models import (construction_constants, lipschitz_encoder_for, lipschitz_model,
                                                    scale_for, sound_constants)
from crmt_plugin.benchmark.recipes import PAIRS, TrainConfig, train
from crmt_plugin.benchmark.report import render_markdown
from crmt_plugin.testing import check_certificates


def tiny_file(path, seed=0):
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 20)
    a = g.normal(size=(len(y), 4)) * np.array([3.0, 0.01, 1.0, 1.0]) + y[:, None] * 2.0
    b = g.normal(size=(len(y), 2, 8)) + y[:, None, None] * 1.5
    c = g.normal(size=(len(y), 1, 6, 6)) + y[:, None, None, None]
    np.savez(path, x_a=a.astype(np.float32), x_b=b.astype(np.float32), x_c=c.astype(np.float32), y=y)
    return str(path)


def test_scale_has_the_rms_constant_and_never_amplifies(tmp_path):
    x = torch.randn(500, 4) * torch.tensor([3.0, 0.01, 1.0, 1.0])
    scale = scale_for(x)
    rms = float(x.double().std(0, unbiased=False).pow(2).mean().sqrt())
    assert abs(scale.lipschitz() - 1 / rms) < 1e-4 / rms
    assert bool((scale.scale >= rms * (1 - 1e-6)).all())


@pytest.mark.parametrize("shape", [(5,), (2, 9), (1, 7, 7)])
def test_encoders_are_bounded_by_their_scale(shape):
    torch.manual_seed(0)
    enc = lipschitz_encoder_for(shape, torch.randn(40, *shape) * 2, 60, 3)
    from crmt_plugin.bounds import lipschitz_upper_bound

    bound = lipschitz_upper_bound(enc, shape)
    assert bound <= enc[0].lipschitz() * (1 + 1e-5)
    assert enc(torch.randn(3, *shape)).shape == (3, enc.out_features)


@pytest.mark.parametrize("method", ["lip-jt", "crmt-lip"])
def test_methods_train_with_sound_certificates_and_no_violation(tmp_path, method):
    data = load_npz(tiny_file(tmp_path / "t.npz"))
    trained = train(method, data, TrainConfig(epochs=2, min_steps=0, batch_size=16, train_eps=0.5), seed=0)
    wrapper = trained.crmt if trained.crmt is not None else certifiable_copy(trained.model)
    lip = sound_constants(wrapper.model, data)
    assert lip.sound and lip.source == "bound"
    by_construction = construction_constants(wrapper.model)
    assert all(float(v) <= by_construction[n] * (1 + 1e-5) for n, v in zip(lip.modalities, lip.values))
    x, y = data.part("test")
    cert = wrapper.certify(x, y, lipschitz=lip)
    assert cert.sound and float(cert.radius.max()) > 0
    report = check_certificates(wrapper, batch_list(x, y), lipschitz=lip, steps=20, restarts=1)
    assert report.ok, str(report)
    if method == "crmt-lip":
        assert trained.step2 is not None and trained.step2["accuracy_after"] >= 0.0


def test_cli_rows_carry_sound_columns_and_the_region(tmp_path, capsys):
    path = tiny_file(tmp_path / "t.npz")
    out = tmp_path / "out"
    assert ("lip-jt", "crmt-lip") in PAIRS
    code = cli.main(["--data", path, "--methods", "lip-jt,crmt-lip", "--radius", "0.5", "--quick", "--seeds", "0",
                     "--no-progress", "--threads", "1", "--batch-size", "16", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    for row in results["rows"]:
        assert 0.0 <= row["certified_sound"] <= 1.0 and "certified_sound_note" not in row
        for m in ("a", "b", "c"):
            assert 0.0 <= row[f"certified_sound:{m}"] <= 1.0
            assert row[f"certified_sound:{m}"] >= row["certified_sound"] - 1e-12   # one modality: a weaker threat
        region = {tuple(sorted(e["eps"].items())): e["certified"] for e in row["certified_sound_region"]}
        zero = tuple(sorted({"a": 0.0, "b": 0.0, "c": 0.0}.items()))
        assert region[zero] >= row["certified_sound"]
        assert row["certified_sound_curve"]["joint"][0][1] == pytest.approx(row["clean"])
    page = render_markdown(results)
    assert "Sound certified region" in page and "cert. sound a" in page and "crmt-lip − lip-jt" in page


def test_rows_of_models_without_a_sound_bound_say_zero(tmp_path, capsys):
    path = tiny_file(tmp_path / "t.npz")
    out = tmp_path / "out"
    code = cli.main(["--data", path, "--methods", "jt", "--radius", "0.5", "--quick", "--seeds", "0", "--no-progress",
                     "--threads", "1", "--batch-size", "16", "--out", str(out), "--no-sound"])
    assert code == 0, capsys.readouterr().err
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["certified_sound"] == 0.0 and row["certified_sound:a"] == 0.0 and row["certified_sound_note"]


def test_lipschitz_model_is_a_benchmark_net(tmp_path):
    data = load_npz(tiny_file(tmp_path / "t.npz"))
    model = lipschitz_model(data)
    x, _ = data.part("train")
    assert model(**x).shape == (x["a"].shape[0], 3)
    assert set(model.feature_dims) == {"a", "b", "c"}


def test_certification_figure_script_runs_on_a_quick_run(tmp_path, capsys, monkeypatch):
    import importlib.util
    import os
    import sys

    path = tiny_file(tmp_path / "t.npz")
    out = tmp_path / "out"
    assert cli.main(["--data", path, "--methods", "lip-jt,crmt-lip", "--radius", "0.5", "--quick", "--seeds", "0",
                     "--no-progress", "--threads", "1", "--batch-size", "16", "--out", str(out)]) == 0
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                          "lipschitz_certification.py")
    spec = importlib.util.spec_from_file_location("lipschitz_certification", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["x", str(out), "--out", str(tmp_path / "fig.png")])
    module.main()
    printed = capsys.readouterr().out
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert "| crmt-lip (r=0.5) | sound | joint |" in printed and "| lip-jt (r=0.5) | empirical | a |" in printed


def vector_file(path, seed=0):
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 30)
    a = g.normal(size=(len(y), 4)) + y[:, None] * 1.5
    b = g.normal(size=(len(y), 3)) + y[:, None] * 0.7
    np.savez(path, x_a=a.astype(np.float32), x_b=b.astype(np.float32), y=y)
    return str(path)


@pytest.mark.parametrize("method", ["lip-jt", "crmt-lip"])
def test_epoch_selection_uses_the_sound_certificate_of_the_evaluation(tmp_path, method):
    """lip-jt / crmt-lip keep the epoch with the best validation sound certified accuracy at the training radius,
    and that figure is the evaluation's own sound joint certificate (sound_summary) for either head."""
    from crmt_plugin.benchmark.lipschitz_models import sound_certified_accuracy
    from crmt_plugin.benchmark.sound_certificates import sound_summary

    data = load_npz(vector_file(tmp_path / "v.npz"))
    trained = train(method, data, TrainConfig(epochs=4, min_steps=0, batch_size=16, train_eps=0.3), seed=0)
    scores = [h["val_certified_sound"] for h in trained.history]
    assert trained.best_val == max(scores) and scores[trained.best_epoch - 1] == max(scores)
    assert scores.index(max(scores)) <= trained.best_epoch - 1  # ties: a later epoch only with a lower loss
    wrapper = trained.crmt if trained.crmt is not None else certifiable_copy(trained.model)
    lip = sound_constants(wrapper.model, data)
    x, y = data.part("test")
    for radius in (0.0, 0.1, 0.3, 1.0):
        expected = sound_summary(wrapper, lip, x, y, radius)["certified_sound"]
        assert sound_certified_accuracy(trained.model, x, y, radius) == pytest.approx(expected, abs=1e-9), radius
    assert sound_certified_accuracy(trained.model, x, y, 0.0) <= 1.0
    train_modes = [m.training for m in trained.model.modules()]
    sound_certified_accuracy(trained.model, x, y, 0.3)
    assert [m.training for m in trained.model.modules()] == train_modes
