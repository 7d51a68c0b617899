"""crmt-benchmark: the file format, the encoder per shape, bad inputs, a --quick run end to end, and
the saved raw-input model.pt in a fresh process. Tiny synthetic files; the whole file runs in well
under a minute on one core."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from crmt_plugin.benchmark import cli
from crmt_plugin.benchmark.data import load_npz, save_npz, standardization, stratified_split
from crmt_plugin.benchmark.evaluate import RandomSearchL2
from crmt_plugin.benchmark.models import (BenchmarkNet, Conv1dEncoder, Conv2dEncoder, MLPEncoder, build_model,
                                          encoder_for)
from crmt_plugin.errors import CRMTError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(n_per_class=20, classes=3, seed=0):
    """Learnable two-modality data: a (N, 4) vector and b (N, 2, 8) sequence carry the class."""
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    a = g.normal(size=(len(y), 4)) * 3 + 10 + y[:, None] * 2.0
    b = g.normal(size=(len(y), 2, 8)) + y[:, None, None] * 1.5
    return {"x_a": a.astype(np.float32), "x_b": b.astype(np.float32), "y": y}


def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_file_format_and_stratified_split(tmp_path):
    arrays = tiny()
    data = load_npz(write(tmp_path / "t.npz", **arrays), data_seed=3)
    assert data.modalities == ("a", "b") and data.num_classes == 3 and not data.split_given
    assert data.sample_shapes() == {"a": (4,), "b": (2, 8)}
    assert data.sizes() == {"train": 36, "validation": 12, "test": 12}
    for code in (0, 1, 2):  # stratified: every class in every part
        assert set(data.y[data.split == code].tolist()) == {0, 1, 2}
    again = load_npz(str(tmp_path / "t.npz"), data_seed=3)
    assert torch.equal(again.split, data.split)
    other = load_npz(str(tmp_path / "t.npz"), data_seed=4)
    assert not torch.equal(other.split, data.split)
    assert torch.allclose(data.x["a"], torch.from_numpy(arrays["x_a"]))


def test_given_split_is_used_and_save_npz_round_trips(tmp_path):
    arrays = tiny()
    split = stratified_split(torch.from_numpy(arrays["y"]), seed=1)
    path = save_npz(str(tmp_path / "s.npz"), {"a": arrays["x_a"], "b": torch.from_numpy(arrays["x_b"])},
                    arrays["y"], split)
    data = load_npz(path)
    assert data.split_given and torch.equal(data.split, split)
    xs, ys = data.part("test")
    assert ys.shape[0] == int((split == 2).sum()) and xs["b"].shape[1:] == (2, 8)


def test_standardization_per_feature_and_per_channel():
    x = torch.randn(500, 3) * torch.tensor([1.0, 5.0, 0.0]) + torch.tensor([2.0, -1.0, 7.0])
    mean, std = standardization(x)
    assert mean.shape == (3,) and torch.allclose(mean, x.mean(0), atol=1e-5)
    assert std[2] == 1.0  # a constant feature keeps std 1
    img = torch.randn(50, 2, 4, 4) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    mean, std = standardization(img)
    assert mean.shape == (2, 1, 1) and std[1, 0, 0] > 2 * std[0, 0, 0]


@pytest.mark.parametrize("shape, kind", [((7,), MLPEncoder), ((3, 16), Conv1dEncoder), ((1, 12, 12), Conv2dEncoder)])
def test_encoder_choice_per_shape(shape, kind):
    mean, std = standardization(torch.randn(10, *shape))
    enc = encoder_for(shape, mean, std, 1200, 10)
    assert isinstance(enc, kind)
    assert enc(torch.randn(5, *shape)).shape == (5, enc.out_features)
    assert any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in enc.modules())
    with pytest.raises(CRMTError, match="no encoder"):
        encoder_for((1, 2, 3, 4), torch.zeros(1), torch.ones(1), 10, 2)


def test_model_takes_raw_inputs_and_standardises_inside():
    raw = {"a": torch.randn(40, 4) * 100 + 50, "b": torch.randn(40, 2, 8)}
    stats = {n: standardization(t) for n, t in raw.items()}
    net = build_model({"a": (4,), "b": (2, 8)}, stats, 40, 3).eval()
    assert isinstance(net, BenchmarkNet) and isinstance(net.fusion, torch.nn.Linear)
    assert net(**raw).shape == (40, 3)
    standardized = net.encoders["a"][0](raw["a"])
    assert torch.allclose(standardized.mean(0), torch.zeros(4), atol=1e-4)
    assert "mean" in dict(net.encoders["a"][0].named_buffers())
    with pytest.raises(CRMTError, match="missing"):
        net(a=raw["a"])


def test_random_search_stays_in_budget_and_finds_errors():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 2)
    model = lambda a, b: lin(torch.cat([a, b], 1))  # noqa: E731
    x = {"a": torch.randn(64, 3), "b": torch.randn(64, 3)}
    y = lin(torch.cat([x["a"], x["b"]], 1)).argmax(1)
    adv = RandomSearchL2(50.0, queries=200, generator=torch.Generator().manual_seed(0))(model, x, y)
    norm = (sum(((adv[n] - x[n]) ** 2).sum(1) for n in x)).sqrt()
    assert float(norm.max()) <= 50.0 * (1 + 1e-5)
    assert float((model(**adv).argmax(1) == y).double().mean()) < 0.2  # a huge budget flips nearly all


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


BAD = {
    "missing y": (lambda a: {k: v for k, v in a.items() if k != "y"}, "no 'y'"),
    "one modality": (lambda a: {"x_a": a["x_a"], "y": a["y"]}, "at least 2 modalities"),
    "different N": (lambda a: {**a, "x_b": a["x_b"][:-1]}, "different numbers of samples"),
    "NaN": (lambda a: {**a, "x_a": np.where(np.arange(60)[:, None] == 3, np.nan, a["x_a"])}, "NaN/Inf"),
    "Inf": (lambda a: {**a, "x_b": np.where(np.arange(60)[:, None, None] == 5, np.inf, a["x_b"])}, "NaN/Inf"),
    "negative label": (lambda a: {**a, "y": np.where(np.arange(60) == 0, -1, a["y"])}, "negative"),
    "class gap": (lambda a: {**a, "y": np.where(a["y"] == 1, 3, a["y"])}, "no sample"),
    "tiny class": (lambda a: {**a, "y": np.concatenate([a["y"][:-3], [3, 3, 3]])}, "fewer than 5"),
    "float labels": (lambda a: {**a, "y": a["y"] + 0.5}, "integer labels"),
    "bad split": (lambda a: {**a, "split": np.full(60, 4)}, "split must hold"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    change, needle = BAD[case]
    path = write(tmp_path / "bad.npz", **change(tiny()))
    out = tmp_path / "out"
    code, err = run_cli(["--data", path, "--out", str(out), "--quick", "--no-progress"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("crmt-benchmark: error:") and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--methods", "jt,crmt-xx"], "unknown method"),
    (["--radius", "-1"], "--radius"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--epochs", "0"], "--epochs"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_one_line_exit_2(extra, needle, tmp_path, capsys):
    path = write(tmp_path / "ok.npz", **tiny())
    out = tmp_path / "out"
    code, err = run_cli(["--data", path, "--out", str(out), "--quick", "--no-progress", *extra], capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_unwritable_out_and_missing_file(tmp_path, capsys):
    path = write(tmp_path / "ok.npz", **tiny())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = run_cli(["--data", path, "--out", str(blocker / "sub"), "--quick", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "not a directory" in err[0]
    code, err = run_cli(["--data", path, "--out", str(blocker), "--quick", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "not a directory" in err[0]
    out = tmp_path / "never"
    code, err = run_cli(["--data", str(tmp_path / "absent.npz"), "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "no such file" in err[0] and not out.exists()
    (tmp_path / "junk.npz").write_text("not a zip")
    code, err = run_cli(["--data", str(tmp_path / "junk.npz"), "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and len(err) == 1 and "not a readable .npz" in err[0] and not out.exists()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    path = write(folder / "tiny.npz", **tiny())
    out = folder / "out"
    code = cli.main(["--data", path, "--quick", "--seeds", "0", "1", "--methods", "jt,crmt-jt,mixup",
                     "--out", str(out), "--no-progress", "--no-sound", "--batch-size", "8"])
    return code, path, out


def test_quick_run_end_to_end(quick_run):
    code, _, out = quick_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["modalities"] == ["a", "b"] and results["classes"] == 3 and results["radius"] > 0
    assert results["radius_source"].startswith("auto")
    rows = results["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in ("jt", "crmt-jt", "mixup") for s in (0, 1)]
    for r in rows:
        for key in ("clean", "pgd_joint", "worst_joint", "pgd:a", "pgd:b", "missing:a", "missing:b",
                    "certified_empirical", "gradient_free", "mean_robust"):
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
        # the worst case is per sample over every attack: never above any one of them
        assert r["worst_joint"] <= min(r["clean"], r["pgd_joint"], r["pgd:a"], r["pgd:b"], r["gradient_free"]) + 1e-9
        assert isinstance(r["gradient_masking"], bool)
        assert set(r["curve"]) == {"joint", "a", "b"}
        assert (out / r["model"]).is_file()
    assert rows[2]["step2"] is not None  # crmt-jt ran step 2
    text = (out / "results.md").read_text()
    assert "| crmt-jt |" in text and "crmt-jt − jt" in text and "±" in text
    assert (out / "robustness.png").stat().st_size > 0


def test_model_pt_loads_in_a_fresh_process_and_reproduces_clean_accuracy(quick_run):
    code, path, out = quick_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    row = next(r for r in results["rows"] if r["method"] == "crmt-jt" and r["seed"] == 1)
    script = (
        "import sys, torch\n"
        "from crmt_plugin.benchmark.data import load_npz\n"
        "model = torch.load(sys.argv[1], weights_only=False).eval()\n"
        "assert all(type(m).__name__ != 'CRMTHead' for m in model.modules())\n"
        "x, y = load_npz(sys.argv[2]).part('test')\n"
        "n = int(sys.argv[3])\n"
        "with torch.no_grad():\n"
        "    acc = (model(**{k: v[:n] for k, v in x.items()}).argmax(1) == y[:n]).double().mean()\n"
        "print(float(acc))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(out / row["model"]), path, str(row["test_samples"])],
                          capture_output=True, text=True, cwd=str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    assert abs(float(done.stdout.strip()) - row["clean"]) < 1e-9


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "crmt_plugin.benchmark", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--radius" in done.stdout and "--quick" in done.stdout


@pytest.mark.parametrize("method", ["crmt-jt", "crmt-at", "crmt-trades", "crmt-mix", "paper-crmt-jt"])
def test_every_crmt_recipe_but_the_papers_gets_the_shared_scale(method, tmp_path):
    from crmt_plugin.benchmark.recipes import SHARED_SCALE, TrainConfig, train

    data = load_npz(write(tmp_path / "tiny.npz", **tiny()))
    trained = train(method, data, TrainConfig(epochs=1, min_steps=0, train_eps=0.5), seed=0)
    head = trained.crmt.head
    assert (head.log_scale is not None) == (method != "paper-crmt-jt") == (method in SHARED_SCALE)
    assert head.log_scale is None or head.scale_gain == 1.0
    x, _ = data.part("test")
    with torch.no_grad():  # the exported plain model is the CRMT model, scale included
        torch.testing.assert_close(trained.model(**x), trained.crmt(x).logits, rtol=1e-5, atol=1e-5)


def test_loss_flags_reach_crmt_loss_of_every_crmt_recipe_but_the_papers(tmp_path, monkeypatch, capsys):
    """--rho / --margin / --penalty / --margin-target are what crmt_loss receives (the paper's recipe keeps
    its own formula), and results.json records them."""
    from crmt_plugin.benchmark import recipes

    seen = []
    real = recipes.crmt_loss

    def spy(out, y, **kw):
        seen.append(kw)
        return real(out, y, **kw)

    monkeypatch.setattr(recipes, "crmt_loss", spy)
    path = write(tmp_path / "tiny.npz", **tiny())
    flags = ["--rho", "0.3", "--margin", "raw", "--penalty", "hinge", "--margin-target", "2.5"]
    code, _ = run_cli(["--data", path, "--quick", "--seeds", "0", "--methods", "crmt-jt,paper-crmt-jt", "--no-sound",
                       "--out", str(tmp_path / "out"), "--no-progress", *flags], capsys)
    assert code == 0
    wanted = {"rho": 0.3, "margin": "raw", "penalty": "hinge", "margin_target": 2.5}
    assert wanted in seen and {"rho": 2.0, "margin": "raw"} in seen
    assert all(kw in (wanted, {"rho": 2.0, "margin": "raw"}) for kw in seen)
    with open(tmp_path / "out" / "results.json") as f:
        recorded = json.load(f)["train_config"]
    assert {k: recorded[k] for k in wanted} == wanted


@pytest.mark.parametrize("flag, expected", [
    (None, {"crmt-jt": 0.1, "crmt-mix": 0.1, "crmt-at": None, "crmt-trades": None, "paper-crmt-jt": 0.1}),
    ("fit", {"crmt-jt": None, "crmt-mix": None, "crmt-at": None, "crmt-trades": None, "paper-crmt-jt": 0.1}),
    (0.5, {"crmt-jt": 0.5, "crmt-mix": 0.5, "crmt-at": 0.5, "crmt-trades": 0.5, "paper-crmt-jt": 0.1}),
])
def test_initial_a_per_recipe_and_its_override(flag, expected, tmp_path, monkeypatch):
    """INTEGRATION_INIT (0.1 for JT and Mixup, the wrapper's fitted default for AT and TRADES) reaches
    CRMTWrapper; TrainConfig.integration_init overrides it for every recipe but the paper's."""
    from crmt_plugin.benchmark import recipes

    if flag is None:
        assert recipes.INTEGRATION_INIT == expected
    real = recipes.CRMTWrapper

    def spy(model, **kw):
        seen.append(kw.get("integration_init"))
        return real(model, **kw)

    monkeypatch.setattr(recipes, "CRMTWrapper", spy)
    data = load_npz(write(tmp_path / "tiny.npz", **tiny()))
    for method, start in expected.items():
        seen = []
        cfg = recipes.TrainConfig(epochs=1, min_steps=0, train_eps=0.5, integration_init=flag)
        trained = recipes.train(method, data, cfg, seed=0)
        assert seen == [start], method
        assert trained.crmt is not None


def test_integration_init_flag_is_validated(tmp_path, capsys):
    path = write(tmp_path / "tiny.npz", **tiny())
    for bad in ("0", "-1", "big", "inf"):
        argv = ["--data", path, "--quick", "--integration-init", bad, "--out", str(tmp_path / "o")]
        code, err = run_cli(argv, capsys)
        assert code != 0 and any("--integration-init" in line for line in err), bad


def test_select_and_encoder_flags_end_to_end(tmp_path, capsys):
    """--select trains every candidate and records them; --encoder ln / frozen build those families."""
    path = write(tmp_path / "t.npz", **tiny())
    code, _ = run_cli(["--data", path, "--quick", "--seeds", "0", "--methods", "jt,crmt-jt", "--no-sound",
                       "--select", "--select-candidates", "0", "0.5", "--encoder", "ln", "--radius", "0.5",
                       "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    jt, crmt = rows
    assert "selection" not in jt
    # the baseline (rho None) first, then the candidates
    assert [c["rho"] for c in crmt["selection"]["candidates"]] == [None, 0.0, 0.5] and crmt["rho"] in (None, 0.0, 0.5)
    baseline_scores = crmt["selection"]["candidates"][0]
    assert crmt["selection"]["reference_clean"] == baseline_scores["clean"]
    if crmt["rho"] is None:  # the baseline chosen: the row is JT's model under crmt-jt's name
        assert crmt["method"] == "crmt-jt" and crmt["clean"] == jt["clean"] and crmt["worst_joint"] == jt["worst_joint"]
    assert crmt["schedule"]["steps"] == crmt["schedule"]["epochs"] * crmt["schedule"]["steps_per_epoch"]
    model = torch.load(tmp_path / "o" / crmt["model"], weights_only=False)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    code, _ = run_cli(["--data", path, "--quick", "--seeds", "0", "--methods", "jt", "--no-sound", "--encoder",
                       "frozen", "--radius", "0.5", "--out", str(tmp_path / "f"), "--no-progress"], capsys)
    assert code == 0
    model = torch.load(tmp_path / "f" / "jt" / "seed0" / "model.pt", weights_only=False)
    assert any(type(m).__name__ == "FrozenEncoder" for m in model.modules())


def test_select_falls_back_to_the_trained_baseline(tmp_path, monkeypatch):
    """When no CRMT candidate is within the tolerance of the baseline's clean accuracy and more robust, the
    selection returns the baseline's own model (rho None) under the CRMT method's name; without the baseline
    (--no-select-baseline) it never does."""
    from crmt_plugin.benchmark import select as select_module
    from crmt_plugin.benchmark.recipes import TrainConfig

    data = load_npz(write(tmp_path / "t.npz", **tiny()))
    cfg = TrainConfig(epochs=1, min_steps=0, batch_size=8, train_eps=0.5)
    scores = iter([{"clean": 0.9, "mean_robust": 0.5},    # baseline
                   {"clean": 0.8, "mean_robust": 0.9},    # rho 0: more robust but 10 points less accurate
                   {"clean": 0.95, "mean_robust": 0.4}])  # rho 0.5: accurate, less robust
    monkeypatch.setattr(select_module, "validation_scores", lambda *a, **k: next(scores))
    trained = select_module.train_selected("crmt-at", data, cfg, seed=0, radius=0.5, candidates=(0.0, 0.5))
    assert trained.method == "crmt-at" and trained.crmt is None and trained.selection["rho"] is None
    assert [c["rho"] for c in trained.selection["candidates"]] == [None, 0.0, 0.5]
    assert [c["eligible"] for c in trained.selection["candidates"]] == [1.0, 0.0, 1.0]
    scores = iter([{"clean": 0.8, "mean_robust": 0.9}, {"clean": 0.95, "mean_robust": 0.4}])
    trained = select_module.train_selected("crmt-at", data, cfg, seed=0, radius=0.5, candidates=(0.0, 0.5),
                                           baseline=False)
    assert trained.selection["rho"] == 0.0 and trained.crmt is not None  # rho 0 is the reference: eligible


def test_select_reuses_a_given_baseline_and_checks_it(tmp_path, monkeypatch):
    from crmt_plugin.benchmark import select as select_module
    from crmt_plugin.benchmark.recipes import TrainConfig, train

    data = load_npz(write(tmp_path / "t.npz", **tiny()))
    cfg = TrainConfig(epochs=1, min_steps=0, batch_size=8, train_eps=0.5)
    jt = train("jt", data, cfg, seed=0)
    monkeypatch.setattr(select_module, "validation_scores", lambda *a, **k: {"clean": 0.9, "mean_robust": 0.5})
    jt.train_seconds = 1e6  # a reused baseline costs the selection no training time
    trained = select_module.train_selected("crmt-jt", data, cfg, seed=0, radius=0.5, candidates=(0.0,), baseline=jt)
    assert trained.selection["rho"] is None and trained.model is jt.model  # ties go to the baseline
    assert 0 < trained.selection["train_seconds_all"] < 1e6
    with pytest.raises(CRMTError, match="baseline of crmt-jt seed 1"):
        select_module.train_selected("crmt-jt", data, cfg, seed=1, radius=0.5, candidates=(0.0,), baseline=jt)


def test_min_steps_sets_the_epochs(tmp_path):
    from crmt_plugin.benchmark.recipes import TrainConfig, train

    data = load_npz(write(tmp_path / "t.npz", **tiny()))
    trained = train("jt", data, TrainConfig(epochs=1, min_steps=40, batch_size=8, train_eps=0.5), seed=0)
    # 36 training samples in batches of 8: 5 steps an epoch (the last batch of 4 included), 8 epochs for 40 steps
    assert trained.schedule.steps_per_epoch == 5 and trained.schedule.epochs == 8 and len(trained.history) == 8


@pytest.mark.parametrize("method", ["crmt-jt", "crmt-at", "crmt-trades", "crmt-mix", "paper-crmt-jt", "jt"])
def test_the_missing_fill_term_is_in_the_crmt_recipes_but_the_papers(method, tmp_path, monkeypatch):
    """--missing-fill-weight w: crmt-jt/-at/-trades/-mix add w x crmt.missing_fill_loss(train mean) every step; the
    paper's recipe and the baselines never call it; w = 0 turns it off."""
    from crmt_plugin import CRMTWrapper
    from crmt_plugin.benchmark.recipes import NEUTRAL_FILL_METHODS, TrainConfig, train

    calls = []
    real = CRMTWrapper.missing_fill_loss

    def spy(self, fill, modalities=None):
        calls.append(({n: t.clone() for n, t in fill.items()}, modalities))
        return real(self, fill, modalities)

    monkeypatch.setattr(CRMTWrapper, "missing_fill_loss", spy)
    data = load_npz(write(tmp_path / "tiny.npz", **tiny()))
    for weight in (1.0, 0.0):
        calls.clear()
        train(method, data, TrainConfig(epochs=1, min_steps=0, train_eps=0.5, missing_fill_weight=weight), seed=0)
        expected = method in NEUTRAL_FILL_METHODS and weight > 0
        assert bool(calls) == expected, (method, weight, len(calls))
        if expected:
            means = data.train_mean()
            fill, constrained = calls[0]
            for n, t in fill.items():
                assert t.shape == data.x[n].shape[1:]
                torch.testing.assert_close(t, means[n].expand_as(t))
            train_x, _ = data.part("train")
            assert constrained == recipes_fill_gate(train_x, fill, 0.5)


def recipes_fill_gate(train_x, fill, radius):
    from crmt_plugin.benchmark.recipes import neutral_fill_modalities

    return neutral_fill_modalities(train_x, fill, radius)


def test_the_missing_fill_term_leaves_out_a_modality_whose_fill_is_a_plausible_input():
    """A modality with more than 1 % of its training samples within the radius of its fill is not constrained (its
    fill is a real input there); one with a few such samples still is."""
    from crmt_plugin.benchmark.recipes import PLAUSIBLE_FILL_SHARE, neutral_fill_modalities

    gen = torch.Generator().manual_seed(0)
    far = torch.randn(200, 5, generator=gen) + 10.0                     # nothing near the fill 0
    near = torch.randn(200, 5, generator=gen) + 10.0
    near[:10] = 0.01 * torch.randn(10, 5, generator=gen)               # 5 % of the samples at the fill
    few = torch.randn(200, 5, generator=gen) + 10.0
    few[:1] = 0.0                                                       # 0.5 %: an outlier
    fill = {n: torch.zeros(5) for n in ("far", "near", "few")}
    assert PLAUSIBLE_FILL_SHARE == 0.01
    assert neutral_fill_modalities({"far": far, "near": near, "few": few}, fill, radius=1.0) == ["far", "few"]
    assert neutral_fill_modalities({"near": near}, fill, radius=1e-6) == ["near"]    # nothing within a tiny radius
