"""Smoke test of an installed crmt_plugin wheel in a runtime-only environment (torch + einops).

Run it from outside the source tree, in a virtual environment where only the wheel and its runtime
dependencies are installed (``.ci/run`` does this)::

    cd /tmp && python /path/to/scripts/smoke_wheel.py

Checks, in order: ``crmt_plugin`` is the installed copy (not the checkout); the optional dependencies
are absent (so the next step means something); every module of the package, subpackages included,
imports without them; a tiny late-fusion model wraps, trains one step, gets Lipschitz constants,
fits the integration weights, certifies, is attacked, saves/loads, and exports to a plain model that
loads into the never-wrapped class; a feature that needs an optional dependency says how to install
it; the ``crmt-benchmark`` console script runs (once ``crmt_plugin.benchmark.cli`` exists).
Exits non-zero at the first failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import pkgutil
import subprocess
import sys
import time

import torch
from torch import nn

OPTIONAL = ("numpy", "scipy", "tqdm", "matplotlib", "torchattacks", "pytest", "hypothesis", "lightning")
started = time.perf_counter()


def step(message: str) -> None:
    print(f"[smoke {time.perf_counter() - started:5.1f}s] {message}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"smoke_wheel: FAILED: {message}")


# ---------------------------------------------------------------- the installed copy, no extras
import crmt_plugin  # noqa: E402  (after the helpers on purpose: the import is the first check)

location = os.path.realpath(crmt_plugin.__file__)
check(location.startswith(os.path.realpath(sys.prefix) + os.sep),
      f"crmt_plugin imported from {location}, not from the environment {sys.prefix} (run from another cwd)")
step(f"crmt_plugin {crmt_plugin.__version__} from {location}")
present = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
check(not present, f"optional packages {present} are installed: this is not a runtime-only environment")
step(f"runtime-only environment: torch {torch.__version__}, none of {', '.join(OPTIONAL)}")

# ---------------------------------------------------------------- every module imports lazily
# Every .py file of the installed package, directories without __init__.py (namespace packages) included;
# ``__main__`` modules are skipped (importing one runs it).
root = os.path.dirname(location)
modules = []
for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
    relative = os.path.relpath(folder, root)
    package = ".".join(["crmt_plugin", *([] if relative == "." else relative.split(os.sep))])
    for file in sorted(files):
        if file.endswith(".py") and file != "__main__.py":
            modules.append(package if file == "__init__.py" else f"{package}.{file[:-3]}")
walked = {info.name for info in pkgutil.walk_packages(crmt_plugin.__path__, "crmt_plugin.")}
check(walked <= set(modules) | {m for m in walked if m.endswith("__main__")},
      f"pkgutil finds modules the file walk missed: {sorted(walked - set(modules))}")
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001  (report which module and why, then fail)
        raise SystemExit(f"smoke_wheel: FAILED: import {name}: {type(exc).__name__}: {exc}") from None
check(len(modules) > 5, f"only {len(modules)} modules found in the wheel: {modules}")
step(f"imported {len(modules)} modules: {' '.join(modules)}")


# ---------------------------------------------------------------- a tiny model, end to end
class TinyFusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.image = nn.Sequential(nn.Linear(10, 4), nn.Tanh())
        self.fusion = nn.Module()
        self.fusion.fc = nn.Linear(12, 3)

    def forward(self, audio: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.fusion.fc(torch.cat([self.audio(audio), self.image(image)], dim=1))


torch.manual_seed(0)
batches = [({"audio": torch.randn(16, 6), "image": torch.randn(16, 10)}, torch.randint(0, 3, (16,)))
           for _ in range(3)]
model = TinyFusion()
crmt = crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities={"audio": 8, "image": 4})
optimizer = torch.optim.SGD(crmt.parameters(), lr=0.1)
crmt.check_optimizer(optimizer)
inputs, y = batches[0]
before = {n: p.detach().clone() for n, p in crmt.named_parameters()}
out = crmt(inputs)
check(tuple(out.logits.shape) == (16, 3), f"logits shape {tuple(out.logits.shape)}")
loss = crmt_plugin.crmt_loss(out, y, rho=2.0)
optimizer.zero_grad()
loss.backward()
optimizer.step()
changed = [n for n, p in crmt.named_parameters() if not torch.equal(p, before[n])]
check(bool(torch.isfinite(loss)) and len(changed) > 0, f"training step: loss {loss}, changed {changed}")
step(f"one training step: loss {loss.item():.4f}, {len(changed)} parameter tensors changed")

lip = crmt.estimate_lipschitz(batches)
check(not lip.sound, "empirical Lipschitz constants must say sound=False")
values = [[round(v, 3) for v in row] for row in lip.values.tolist()]
step(f"estimate_lipschitz: {lip.source}, sound={lip.sound}, values {values}")
result = crmt.fit_integration(batches, lipschitz=lip, epochs=2)
step(f"fit_integration: {type(result).__name__}")
cert = crmt.certify(inputs, y, lipschitz=lip)
check(tuple(cert.radius.shape) == (16,) and bool((cert.radius >= 0).all()), f"certificate radius {cert.radius}")
step(f"certify: mean radius {float(cert.radius.mean()):.4f}, sound={cert.sound}")

from crmt_plugin.attacks import PGD  # noqa: E402

adversarial = PGD(0.5, steps=2)(crmt, inputs, y)  # the wrapper: crmt(inputs) -> .logits
moved = max(float((adversarial[n] - inputs[n]).flatten(1).norm(dim=1).max()) for n in inputs)
check(moved <= 0.5 + 1e-5, f"PGD left the l2 ball: {moved}")
step(f"PGD(0.5, steps=2): largest perturbation {moved:.4f}")

buffer = io.BytesIO()
torch.save(crmt.state_dict(), buffer)
buffer.seek(0)
again = crmt_plugin.CRMTWrapper(TinyFusion(), head="fusion.fc", modalities={"audio": 8, "image": 4})
again.load_state_dict(torch.load(buffer, weights_only=True))
with torch.no_grad():
    check(torch.allclose(again(inputs).logits, crmt(inputs).logits), "a reloaded CRMT checkpoint differs")
step("crmt.state_dict() -> torch.save -> torch.load(weights_only=True) -> a new wrapper: same logits")

plain = crmt.export()
check(not any(isinstance(m, crmt_plugin.CRMTHead) for m in plain.modules()), "export still holds a CRMT head")
buffer = io.BytesIO()
torch.save(plain.state_dict(), buffer)
buffer.seek(0)
deployed = TinyFusion()
deployed.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
with torch.no_grad():
    check(torch.allclose(deployed(**inputs), crmt(inputs).logits, atol=1e-5), "exported model's logits differ")
step("export() -> state_dict -> the never-wrapped class (strict=True): same logits")

# ---------------------------------------------------------------- optional features say what to install
try:
    crmt_plugin._optional.require("matplotlib", "plots")
except crmt_plugin.CRMTError as exc:
    check("pip install" in str(exc), f"the missing-dependency message has no install line: {exc}")
    step(f"missing optional dependency -> CRMTError: {exc}")
else:
    check(False, "require('matplotlib') succeeded in a runtime-only environment")

# ---------------------------------------------------------------- the console script
if importlib.util.find_spec("crmt_plugin.benchmark.cli") is not None:
    script = os.path.join(os.path.dirname(sys.executable), "crmt-benchmark")
    check(os.path.exists(script), f"the console script {script} was not installed")
    run = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    check(run.returncode == 0, f"crmt-benchmark --help exited {run.returncode}:\n{run.stdout}\n{run.stderr}")
    step(f"crmt-benchmark --help: exit 0 ({len(run.stdout.splitlines())} lines)")
else:
    step("crmt_plugin.benchmark.cli does not exist yet: console script not checked")

step("OK")
