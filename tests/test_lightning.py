"""CRMT inside PyTorch Lightning, with a real ``Trainer`` on CPU: the wrapped model and ``crmt_loss`` in a
``LightningModule``, :class:`crmt_plugin.lightning.CRMTCallback` (step 2 at the end of ``fit`` on the
trainer's loaders, the logged metrics), checkpoints that reload the post-step-2 head, DDP with two CPU
processes (gloo), warnings at the user's line, and the module without lightning installed.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import crmt_plugin
from crmt_plugin import CRMTError

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - scripts/install.sh installs it
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None

needs_lightning = pytest.mark.skipif(pl is None, reason="lightning is not installed (scripts/install.sh installs it)")

# The LightningModule of the tests, also written to a file for the DDP subprocess (one source of truth).
LIT_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    import crmt_plugin
    from crmt_plugin.models import LateFusionNet

    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl


    def make_loader(n, seed, shuffle=False, batch_size=8):
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 3
        a = torch.randn(n, 3, generator=gen) + 2 * nn.functional.one_hot(y, 3)
        b = torch.randn(n, 2, generator=gen) + (y == 2).float().unsqueeze(1)
        pairs = [({"a": a[i], "b": b[i]}, y[i]) for i in range(n)]
        return torch.utils.data.DataLoader(pairs, batch_size=batch_size, shuffle=shuffle)


    class Lit(pl.LightningModule):
        def __init__(self, lr=1e-2, rho=0.5):
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            net = LateFusionNet({"a": nn.Sequential(nn.Linear(3, 6), nn.ReLU()), "b": nn.Linear(2, 4)},
                                {"a": 6, "b": 4}, 3)
            self.crmt = crmt_plugin.CRMTWrapper(net, head="fusion.fc", modalities={"a": 6, "b": 4},
                                                integration_init=0.1)

        def forward(self, inputs):
            return self.crmt(inputs).logits

        def training_step(self, batch, batch_idx):
            inputs, y = batch
            loss = crmt_plugin.crmt_loss(self.crmt(inputs), y, rho=self.hparams.rho)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            inputs, y = batch
            self.log("val_acc", (self(inputs).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
''')


@pytest.fixture(scope="module")
def lit_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lit")
    (folder / "lit_module.py").write_text(LIT_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        import lit_module

        yield lit_module
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("lit_module", None)


def trainer(tmp_path, callbacks, max_epochs=3, **kwargs):
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                      logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"), enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                      log_every_n_steps=1,
                      **kwargs)


def logged(tmp_path):
    rows = list(csv.DictReader(open(next(pathlib.Path(tmp_path).rglob("metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


@needs_lightning
def test_callback_runs_step2_on_the_trainers_loaders_and_logs(lit_module, tmp_path):
    from crmt_plugin.lightning import CRMTCallback

    callback = CRMTCallback(epochs=5)
    lit = lit_module.Lit()
    train, val = lit_module.make_loader(48, 1, shuffle=True), lit_module.make_loader(24, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own advice (few batches, num_workers)
        trainer(tmp_path, [callback]).fit(lit, train, val)
    result = callback.result
    assert result is not None and result.selected_on == "val"  # the trainer's val_dataloader was the split
    # the callback's validation figures are the ones step 2 measured on the same loader
    assert callback.metrics["crmt/accuracy"] == pytest.approx(result.val_after.accuracy)
    assert callback.metrics["crmt/radius"] == pytest.approx(result.val_after.mean_radius, rel=1e-6)
    a = lit.crmt.integration_weights()
    for name in ("a", "b"):
        assert callback.metrics[f"crmt/a/{name}"] == pytest.approx(float(a[name].double().mean()))
        assert f"crmt/margin/{name}" in callback.metrics and f"crmt/radius/{name}" in callback.metrics
    on_disk = logged(tmp_path)  # the logger got them
    for key, value in callback.metrics.items():
        assert on_disk[key] == pytest.approx(value)
    assert "train_loss" in on_disk and "val_acc" in on_disk  # training_step with crmt_loss ran unchanged


@needs_lightning
def test_step2_in_the_callback_equals_step2_by_hand(lit_module, tmp_path):
    from crmt_plugin.lightning import CRMTCallback

    train, val = lit_module.make_loader(48, 1), lit_module.make_loader(24, 2)
    lit = lit_module.Lit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [CRMTCallback(step2=False)]).fit(lit, train, val)
    by_hand = lit_module.Lit()
    by_hand.load_state_dict(lit.state_dict())
    lip = by_hand.crmt.estimate_lipschitz(train)
    by_hand.crmt.fit_integration(train, lipschitz=lip, val_loader=val, epochs=4)

    callback = CRMTCallback(epochs=4, train_loader=train, val_loader=val)
    callback.on_fit_end(trainer(tmp_path / "again", []), lit)
    for name, a in lit.crmt.integration_weights().items():
        torch.testing.assert_close(a, by_hand.crmt.integration_weights()[name])


@needs_lightning
def test_checkpoint_after_step2_reloads_the_head_and_the_constants(lit_module, tmp_path):
    from crmt_plugin.lightning import CRMTCallback

    path = str(tmp_path / "final.ckpt")
    callback = CRMTCallback(epochs=5, checkpoint_path=path)
    lit = lit_module.Lit()
    train, val = lit_module.make_loader(48, 1, shuffle=True), lit_module.make_loader(24, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [callback]).fit(lit, train, val)
    reloaded = lit_module.Lit.load_from_checkpoint(path)
    inputs, _ = next(iter(val))
    lit.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs), lit(inputs), rtol=0, atol=0)
    for name, a in lit.crmt.integration_weights().items():
        assert torch.equal(reloaded.crmt.integration_weights()[name], a)
    # the callback's state: the Lipschitz constants step 2 used, to certify the reloaded model
    fresh = CRMTCallback()
    states = torch.load(path, weights_only=False)["callbacks"]
    fresh.load_state_dict(states[fresh.state_key])
    torch.testing.assert_close(fresh.lipschitz_used.values, callback.lipschitz_used.values)
    assert fresh.metrics == callback.metrics
    assert fresh.loaded_step2 == callback.state_dict()["step2"] and fresh.loaded_step2["best_epoch"] >= 0
    cert = reloaded.crmt.certify(*next(iter(val)), lipschitz=fresh.lipschitz_used)
    reference = lit.crmt.certify(*next(iter(val)), lipschitz=callback.lipschitz_used)
    torch.testing.assert_close(cert.radius, reference.radius)


@needs_lightning
def test_step2_warning_in_the_callback_names_the_fit_line(tmp_path):
    from crmt_plugin.lightning import CRMTCallback
    from test_warnings import LIP, refusing_step2

    crmt, data = refusing_step2()  # step 2 refuses epochs on it (tests/test_warnings.py)
    (inputs, y), = data
    pairs = [({n: t[i] for n, t in inputs.items()}, y[i]) for i in range(y.shape[0])]

    class Toy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.crmt = crmt

        def training_step(self, batch, batch_idx):
            return crmt_plugin.crmt_loss(self.crmt(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # step 1 leaves the toy as it is

    run = trainer(tmp_path, [CRMTCallback(lipschitz=LIP, epochs=20, lr=0.1)], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        run.fit(Toy(), torch.utils.data.DataLoader(pairs, batch_size=len(pairs)))
    refused = [w for w in caught if "refused" in str(w.message)]
    assert refused, [str(w.message)[:80] for w in caught]
    assert [(pathlib.Path(w.filename).resolve(), w.lineno) for w in refused] == [(pathlib.Path(__file__).resolve(),
                                                                                    line)]


@needs_lightning
def test_callback_pickles_by_reference(lit_module):
    import pickle

    from crmt_plugin.lightning import CRMTCallback

    copy = pickle.loads(pickle.dumps(CRMTCallback(epochs=2)))  # ddp_spawn pickles the trainer's callbacks
    assert type(copy) is CRMTCallback and copy.fit_kwargs == {"epochs": 2}


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from lit_module import Lit, make_loader, pl
    from crmt_plugin.lightning import CRMTCallback

    out = sys.argv[1]
    callback = CRMTCallback(epochs=4, checkpoint_path=os.path.join(out, "final.ckpt"))
    lit = Lit()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=out)
    trainer.fit(lit, make_loader(48, 1, shuffle=True), make_loader(24, 2))
    rank = trainer.global_rank
    a = {n: v.tolist() for n, v in lit.crmt.integration_weights().items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.world_size, "a": a, "metrics": callback.metrics,
                   "fc": lit.crmt.head.integration_weights().sum().item(),
                   "weights": sum(p.double().sum().item() for p in lit.parameters())}, f)
''')


@needs_lightning
def test_ddp_two_cpu_processes(lit_module, tmp_path):
    folder = pathlib.Path(lit_module.__file__).parent
    script = folder / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(folder), os.environ.get(
        "PYTHONPATH", "")]), PL_DISABLE_FORK="1")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    # DDP kept the replicas equal through step 1, and step 2 reduced over ranks kept the same a everywhere
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)
    for name in ranks[0]["a"]:
        assert ranks[0]["a"][name] == pytest.approx(ranks[1]["a"][name], rel=1e-6)
    for key in ranks[0]["metrics"]:  # the logged means are over both shards
        assert ranks[0]["metrics"][key] == pytest.approx(ranks[1]["metrics"][key], rel=1e-6)
    reloaded = lit_module.Lit.load_from_checkpoint(str(tmp_path / "final.ckpt"))
    for name, a in reloaded.crmt.integration_weights().items():
        assert a.tolist() == pytest.approx(ranks[0]["a"][name], rel=1e-6)


def test_module_imports_without_lightning_and_says_how_to_install(monkeypatch):
    import crmt_plugin.lightning as module

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(module.BUILT, "CRMTCallback", raising=False)
    monkeypatch.delitem(module.__dict__, "CRMTCallback", raising=False)
    with pytest.raises(CRMTError, match="pip install lightning"):
        module.CRMTCallback  # noqa: B018
    assert crmt_plugin.lightning is module and "lightning" in dir(crmt_plugin)


def test_find_wrapper_names_what_it_found():
    holder = nn.Module()
    holder.net = nn.Linear(2, 2)
    from crmt_plugin.lightning import find_wrapper

    with pytest.raises(CRMTError, match="found 0"):
        find_wrapper(holder)
    with pytest.raises(CRMTError, match="expected a CRMTWrapper at Module.net, found Linear"):
        find_wrapper(holder, "net")


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
TINY = ["--epochs", "2", "--limit", "48", "--eval-steps", "2", "--eval-restarts", "1", "--queries", "10", "--quiet"]


@needs_lightning
def test_lightning_example_matches_the_plain_loop(tmp_path, monkeypatch):
    """examples/lightning_crmt.py trains CRMT-JT through a Trainer with crmt_plugin.lightning.CRMTCallback;
    on the same seed it reproduces examples/crmt_jt.py's history, a and test summary."""
    import importlib

    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module("lightning_crmt")
    plain = importlib.import_module("crmt_jt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        through = example.main(TINY + ["--method", "crmt-jt", "--out", str(tmp_path / "lightning")])["crmt-jt"]
        loop = plain.main(TINY + ["--out", str(tmp_path / "plain")])
    assert through["summary"] == pytest.approx(loop["summary"], abs=1e-6)
    assert [h["val_accuracy"] for h in through["history"]] == [h["val_accuracy"] for h in loop["history"]]
    assert [h["train_loss"] for h in through["history"]] == pytest.approx([h["train_loss"] for h in loop["history"]],
                                                                        rel=1e-5)
    for name, a in loop["integration_weights"].items():
        assert through["integration_weights"][name] == pytest.approx(a, rel=1e-5)
    assert (tmp_path / "lightning" / "final.ckpt").is_file()
    logged_keys = set(logged(tmp_path / "lightning"))
    assert {"crmt/radius", "crmt/margin/audio", "crmt/a/image", "val_acc", "train_loss"} <= logged_keys
