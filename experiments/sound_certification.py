"""Sound vs empirical certified accuracy on the real audio-visual digits: JT vs CRMT-JT.

    OMP_NUM_THREADS=1 python experiments/sound_certification.py --figures docs/figures

Trains `AVDigitsNet` on `load_av_digits(seed=0)` as

* **JT** - cross-entropy on the fused logits (the plain late-fusion baseline);
* **CRMT-JT** - the CRMT head + `crmt_loss(rho=2)` (step 1), then step 2 (`fit_integration`);

each for every weight lambda of `--penalties`, with `lambda * sum_m log LipschitzPenalty_m()` added to
the training loss (lambda = 0: no penalty). Model selection on the validation split. Then, on the
600 test pairs, certified accuracy vs l2 radius (joint and each modality alone) with

* **sound** constants: `crmt_plugin.bounds.encoder_bounds` (upper bounds L^(m) of the encoders,
  eval mode), certificate with the "tight" denominator;
* **empirical** constants: the largest gradient norm of each uni-modal logit over the training split
  (`crmt.estimate_lipschitz`), certificate with the paper's denominator. A *lower* estimate of the
  true constant: its radii are estimates, not guarantees.

How each model is certified:

* JT is certified **as it is**: `CRMTWrapper(copy, ..., orthonormal=False)` rewrites its head with
  unit-norm rows and their norms as a, which leaves the logits unchanged; the sound joint radius is
  then min_k m_k / sqrt(sum_m (L^(m) ||W_y^(m) - W_k^(m)||)^2) ("tight" denominator through the Gram
  matrix of the rows), the empirical one uses per-class tau and the paper's denominator. Converting
  the trained JT head to an orthonormal CRMT head (the default `CRMTWrapper`) is only approximate:
  the script reports how far the converted logits are from the JT logits.
* CRMT-JT: step 1 once, then step 2 twice on copies - with the empirical constants (the paper's
  recipe; its curve is the dashed one) and with the sound constants (solid curve). Each curve is
  certified with the constants its step 2 optimised for; the table also gives the sound radii of the
  empirically integrated model.

Sanity checks on the test split: l2-PGD on the Carlini-Wagner margin with a per-sample budget of
0.99 x the sound radius (joint, and each modality alone) must flip no prediction; the same attack at
0.99 x the *empirical* radius, and a bisection for the smallest budget at which PGD flips each
prediction (an upper bound of the true robustness radius), show where the true radius lies.

Radii are l2 norms in normalised input units: image pixels standardised with one scalar std (0.31
of pixel/255), audio MFCCs standardised per coefficient (`splits.normalization[m].to_raw_radius`).
Writes `results.json` and `results.md` into `--out` and `certification_*.png` into `--figures`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # the repository (no `pip install -e .`)
    sys.path.insert(0, os.path.dirname(HERE))

import crmt_plugin  # noqa: E402
from crmt_plugin.attacks import PGD, cw_margin_loss  # noqa: E402
from crmt_plugin.bounds import LipschitzPenalty, encoder_bounds  # noqa: E402
from crmt_plugin.certify import Certificate  # noqa: E402
from crmt_plugin.datasets import load_av_digits  # noqa: E402
from crmt_plugin.models import AVDigitsNet  # noqa: E402
from crmt_plugin.benchmark.evaluate import certifiable_copy  # noqa: E402

RADII = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8, help="step-1 epochs per model")
    p.add_argument(
        "--penalties",
        type=float,
        nargs="+",
        default=[0.0, 0.1, 0.3, 1.0],
        help="weights lambda of the LipschitzPenalty term (0 = none); the first is the headline model",
    )
    p.add_argument("--methods", nargs="+", choices=["jt", "crmt"], default=["jt", "crmt"])
    p.add_argument("--rho", type=float, default=2.0, help="CRMT margin-term weight")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (step 1)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--integration-epochs", type=int, default=20, help="step-2 epochs on the cached logits")
    p.add_argument("--radii", type=float, nargs="+", default=list(RADII), help="table radii (normalised units)")
    p.add_argument("--pgd-steps", type=int, default=20, help="steps of the sanity-check PGD")
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument(
        "--bisection-steps",
        type=int,
        default=5,
        help="bisection iterations of the PGD minimal-distance search (headline models; 0 = off)",
    )
    p.add_argument("--bisection-pgd-steps", type=int, default=10, help="PGD steps per bisection probe")
    p.add_argument(
        "--jacobian-samples",
        type=int,
        default=256,
        help="training samples on which the encoder Jacobian spectral norm is measured",
    )
    p.add_argument(
        "--conv-method",
        default="auto",
        choices=["auto", "dense", "fourier"],
        help="convolution bound of encoder_bounds (auto: exact operator norms)",
    )
    p.add_argument(
        "--plot-penalty",
        type=float,
        default=None,
        help="also plot the sound curves of the models trained with this lambda",
    )
    p.add_argument("--limit", type=int, default=None, help="first N samples of each split (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join("runs", "sound_certification"))
    p.add_argument("--figures", default=None, help="where certification_*.png go (default: --out)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# data and training


def subset(dataset, limit: Optional[int]):
    if limit is None or limit >= len(dataset):
        return dataset
    return crmt_plugin.datasets.MultiModalDataset(
        {n: t[:limit] for n, t in dataset.tensors.items()}, dataset.targets[:limit]
    )


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    was = model.training
    model.eval()
    correct = (model(**data.tensors).argmax(1) == data.targets).double().mean().item()
    model.train(was)
    return correct


def train(method: str, lam: float, args, splits, shapes) -> Tuple[nn.Module, Optional[crmt_plugin.CRMTWrapper], Dict]:
    """Step 1 (JT: cross-entropy; CRMT: crmt_loss), + lam * sum_m log penalty_m(); best validation epoch."""
    torch.manual_seed(args.seed)
    model = AVDigitsNet(feature_dim=64, num_classes=splits.num_classes)
    crmt = crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities=model.feature_dims) if method == "crmt" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    penalties = {n: LipschitzPenalty(model.encoders[n], shapes[n]) for n in shapes} if lam > 0 else {}
    loader = torch.utils.data.DataLoader(
        splits.train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    best = (-1.0, 0, None)
    for epoch in range(1, args.epochs + 1):
        model.train()
        for inputs, y in loader:
            loss = (
                F.cross_entropy(model(**inputs), y)
                if crmt is None
                else crmt_plugin.crmt_loss(crmt(inputs), y, rho=args.rho)
            )
            if penalties:
                loss = loss + lam * sum(p().log() for p in penalties.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val = accuracy(model, splits.val)
        if val > best[0]:
            best = (val, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return model, crmt, {"val_accuracy": best[0], "best_epoch": best[1]}


# --------------------------------------------------------------------------------------------------
# certificates


def encoder_jacobian_norms(model: nn.Module, data, samples: int) -> Dict[str, float]:
    """max over `samples` training inputs of the spectral norm of each encoder's Jacobian (a lower
    estimate of L(phi^(m)), like every sampled quantity)."""
    out = {}
    for name, encoder in model.encoders.items():
        x = data.tensors[name][:samples].detach().requires_grad_(True)
        best = 0.0
        for chunk in x.split(64):
            chunk = chunk.detach().requires_grad_(True)
            features = encoder(chunk)
            d = features.shape[1]
            eye = torch.eye(d).unsqueeze(1).expand(d, chunk.shape[0], d)
            (grad,) = torch.autograd.grad(features, chunk, grad_outputs=eye, is_grads_batched=True)
            jac = grad.flatten(2).transpose(0, 1).double()  # (B, d, n_in)
            best = max(best, float(torch.linalg.matrix_norm(jac, ord=2).max()))
        out[name] = best
    return out


def pgd_flips(model, inputs, y, eps: Tensor, modality: Optional[str], args, seed: int) -> Tuple[int, int]:
    """(flipped, attacked): PGD on the CW margin with per-sample budget eps, among samples with eps > 0."""
    attacked = eps > 0
    if not bool(attacked.any()):
        return 0, 0
    sub = {n: t[attacked] for n, t in inputs.items()}
    attack = PGD(
        eps=eps[attacked].float(),
        norm="l2",
        modalities=modality,
        steps=args.pgd_steps,
        restarts=args.pgd_restarts,
        loss=cw_margin_loss,
        generator=torch.Generator().manual_seed(seed),
    )
    adv = attack(model, sub, y[attacked])
    with torch.no_grad():
        logits = model(adv)
        logits = getattr(logits, "logits", logits)
    return int((logits.argmax(1) != y[attacked]).sum()), int(attacked.sum())


def pgd_min_distance(model, inputs, y, lo: Tensor, hi: float, args, seed: int) -> Tensor:
    """Per sample, an upper bound of the smallest joint l2 perturbation that flips the prediction:
    bisection of a per-sample PGD budget between the sound radius `lo` (certified: no flip) and `hi`.
    inf where PGD at `hi` does not flip; 0 for misclassified samples."""
    lo = lo.clone().float()
    correct = lo > 0
    up = torch.full_like(lo, hi)

    def flips(eps: Tensor) -> Tensor:
        out = torch.zeros_like(correct)
        attack = PGD(
            eps=eps[correct],
            norm="l2",
            steps=args.bisection_pgd_steps,
            restarts=args.pgd_restarts,
            loss=cw_margin_loss,
            generator=torch.Generator().manual_seed(seed),
        )
        sub = {n: t[correct] for n, t in inputs.items()}
        adv = attack(model, sub, y[correct])
        with torch.no_grad():
            logits = model(adv)
            logits = getattr(logits, "logits", logits)
        out[correct] = logits.argmax(1) != y[correct]
        return out

    broken = flips(up)
    for _ in range(args.bisection_steps):
        mid = (lo + up) / 2
        f = flips(mid)
        up = torch.where(f, mid, up)
        lo = torch.where(f, lo, mid)
    result = torch.where(broken, up, torch.full_like(up, math.inf))
    return torch.where(correct, result, torch.zeros_like(result)).double()


# --------------------------------------------------------------------------------------------------
# one model: every number


def curve(cert: Certificate, radii: Sequence[float]) -> Dict[str, List[float]]:
    out = {"joint": cert.certified_accuracy(radii).tolist()}
    for name in cert.radius_per_modality:
        out[name] = cert.certified_accuracy(radii, modality=name).tolist()
    return out


def radii_of(cert: Certificate) -> Dict[str, Tensor]:
    return {"joint": cert.radius, **cert.radius_per_modality}


def median_ratio(num: Tensor, den: Tensor) -> Optional[float]:
    keep = (den > 0) & (num > 0)
    return float((num[keep] / den[keep]).median()) if bool(keep.any()) else None


def analyse(method: str, lam: float, model, crmt, info, args, splits, shapes, headline: bool) -> Dict[str, Any]:
    test, train_data = splits.test, splits.train
    x, y = test.tensors, test.targets
    train_loader = torch.utils.data.DataLoader(train_data, batch_size=256)
    started = time.time()
    sound = encoder_bounds({n: model.encoders[n] for n in shapes}, shapes, conv_method=args.conv_method)
    bound_seconds = time.time() - started
    jac = encoder_jacobian_norms(model, train_data, args.jacobian_samples)
    result: Dict[str, Any] = {
        "method": method,
        "penalty": lam,
        **info,
        "clean_accuracy": accuracy(model, test),
        "sound_L": dict(zip(sound.modalities, sound.values.tolist())),
        "bound_seconds": bound_seconds,
        "max_jacobian_norm": jac,
    }
    if method == "jt":
        plain = certifiable_copy(model, "fusion.fc")  # the JT head as it is: unit rows, their norms as a
        empirical = plain.estimate_lipschitz(train_loader)
        cert_sound = plain.certify(x, y, lipschitz=sound)  # tight: L^(m) ||W_y^(m) - W_k^(m)||
        cert_emp = plain.certify(x, y, lipschitz=empirical)
        attack_model = model
        # the approximate conversion, for the record
        converted = crmt_plugin.CRMTWrapper(
            copy.deepcopy(model), head="fusion.fc", modalities=model.feature_dims
        ).eval()
        with torch.no_grad():
            jt_logits = model(**x)
            conv_logits = converted(x).logits
            exported = converted.export().eval()(**x)
        result["conversion"] = {
            "max_abs_logit_diff": float((conv_logits - jt_logits).abs().max()),
            "max_abs_jt_logit": float(jt_logits.abs().max()),
            "relative_diff": float((conv_logits - jt_logits).norm() / jt_logits.norm()),
            "prediction_agreement": float((conv_logits.argmax(1) == jt_logits.argmax(1)).double().mean()),
            "export_max_abs_diff": float((exported - conv_logits).abs().max()),
        }
        result["step2"] = None
        models = {"sound": model, "empirical": model}
    else:
        empirical = crmt.estimate_lipschitz(train_loader)
        step1 = crmt.certify(x, y, lipschitz=sound)
        result["sound_step1_median_radius"] = float(step1.radius.median())
        emp_crmt, sound_crmt = copy.deepcopy(crmt), copy.deepcopy(crmt)
        gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
        step2_emp = emp_crmt.fit_integration(
            train_loader, lipschitz=empirical, epochs=args.integration_epochs, generator=gen()
        )
        step2_sound = sound_crmt.fit_integration(
            train_loader, lipschitz=sound, epochs=args.integration_epochs, generator=gen()
        )
        cert_sound = sound_crmt.certify(x, y, lipschitz=sound)
        cert_emp = emp_crmt.certify(x, y, lipschitz=empirical)
        cert_sound_of_emp = emp_crmt.certify(x, y, lipschitz=sound)
        cert_emp_of_sound = sound_crmt.certify(x, y, lipschitz=empirical)
        result["step2"] = {"empirical": vars(step2_emp), "sound": vars(step2_sound)}
        result["clean_accuracy_after_step2"] = {
            "empirical": float(cert_emp.correct.double().mean()),
            "sound": float(cert_sound.correct.double().mean()),
        }
        result["integration_weights"] = {
            "empirical": {n: a.tolist() for n, a in emp_crmt.integration_weights().items()},
            "sound": {n: a.tolist() for n, a in sound_crmt.integration_weights().items()},
        }
        result["sound_curve_of_empirical_step2"] = curve(cert_sound_of_emp, args.radii)
        result["sound_median_radius_of_empirical_step2"] = float(cert_sound_of_emp.radius.median())
        result["same_model_ratio_empirical_step2"] = median_ratio(cert_emp.radius, cert_sound_of_emp.radius)
        result["same_model_ratio_sound_step2"] = median_ratio(cert_emp_of_sound.radius, cert_sound.radius)
        attack_model = None
        models = {"sound": sound_crmt.eval(), "empirical": emp_crmt.eval()}
        emp_crmt.model.eval()
        sound_crmt.model.eval()
    assert cert_sound.sound and not cert_emp.sound
    tau = empirical.values.amax(dim=1).tolist()  # largest observed gradient norm of a uni-modal logit
    result["empirical_tau_max"] = dict(zip(empirical.modalities, tau))
    result["bound_over_tau"] = {n: result["sound_L"][n] / t for n, t in result["empirical_tau_max"].items()}
    result["bound_over_jacobian"] = {n: result["sound_L"][n] / jac[n] for n in jac}
    result["curves"] = {"sound": curve(cert_sound, args.radii), "empirical": curve(cert_emp, args.radii)}
    result["median_radius"] = {
        kind: {k: float(v.median()) for k, v in radii_of(c).items()}
        for kind, c in (("sound", cert_sound), ("empirical", cert_emp))
    }
    result["empirical_over_sound_median"] = {
        k: median_ratio(radii_of(cert_emp)[k], radii_of(cert_sound)[k]) for k in radii_of(cert_sound)
    }
    result["raw_units"] = {n: splits.normalization[n].to_raw_radius(1.0) for n in shapes}
    # sanity: PGD at 0.99 x the sound radius (joint and each modality alone) flips nothing
    checks = {}
    targets = [("joint", None)] + ([(n, n) for n in shapes] if headline else [])
    for key, modality in targets:
        for kind, cert in (("sound", cert_sound), ("empirical", cert_emp)):
            if kind == "empirical" and (not headline or key != "joint"):
                continue
            eps = 0.99 * radii_of(cert)[key]
            net = attack_model if attack_model is not None else models[kind]
            flipped, attacked = pgd_flips(net, x, y, eps, modality, args, seed=args.seed + 7)
            checks[f"{kind} {key}"] = {"flipped": flipped, "attacked": attacked}
    result["pgd_checks"] = checks
    if headline and args.bisection_steps > 0:
        net = attack_model if attack_model is not None else models["sound"]
        hi = max(4.0, 4 * float(cert_emp.radius.max()))
        dist = pgd_min_distance(net, x, y, cert_sound.radius, hi, args, seed=args.seed + 11)
        # the empirical radii of the same model (JT: same; CRMT: the soundly integrated one)
        emp_same = cert_emp.radius if method == "jt" else cert_emp_of_sound.radius
        ok = dist > 0
        result["pgd_distance"] = {
            "median": float(dist[ok].median()) if bool(ok.any()) else None,
            "not_flipped_at_hi": int(torch.isinf(dist).sum()),
            "hi": hi,
            "median_over_sound": median_ratio(dist, cert_sound.radius),
            "median_over_empirical": median_ratio(dist, emp_same),
            "empirical_radius_exceeds_pgd_distance": int(((emp_same > dist) & ok).sum()),
            "sound_radius_exceeds_pgd_distance": int(((cert_sound.radius > dist) & ok).sum()),
            "attacked": int(ok.sum()),
        }
        result["_distance"] = dist
    result["_certs"] = {"sound": cert_sound, "empirical": cert_emp}
    result["seconds"] = time.time() - started
    return result


# --------------------------------------------------------------------------------------------------
# output


NAMES = {"jt": "JT", "crmt": "CRMT-JT"}


def label(r: Dict[str, Any]) -> str:
    base = NAMES[r["method"]]
    return base if r["penalty"] == 0 else f"{base} + penalty {r['penalty']:g}"


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def curve_table(results: List[Dict[str, Any]], radii: Sequence[float], modalities: Sequence[str]) -> str:
    head = "| model | constants (step 2 on) | perturbed | " + " | ".join(f"{r:g}" for r in radii) + " |"
    lines = [head, "|" + "---|" * (3 + len(radii))]
    for r in results:
        for kind in ("sound", "empirical"):
            step2 = "-" if r["method"] == "jt" else kind
            for key in ("joint",) + tuple(modalities):
                accs = r["curves"][kind][key]
                lines.append(
                    f"| {label(r)} | {kind} ({step2}) | {key if key != 'joint' else '+'.join(modalities)} | "
                    + " | ".join(pct(a) for a in accs)
                    + " |"
                )
        if r["method"] == "crmt":
            accs = r["sound_curve_of_empirical_step2"]["joint"]
            lines.append(
                f"| {label(r)} | sound (empirical) | {'+'.join(modalities)} | "
                + " | ".join(pct(a) for a in accs)
                + " |"
            )
    return "\n".join(lines)


def gap_table(results: List[Dict[str, Any]], modalities: Sequence[str]) -> str:
    lines = [
        "| model | modality | sound L | max tau (largest gradient norm of a logit) | max ||J_phi||_2 "
        "| L / max tau | L / max ||J|| |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for n in modalities:
            lines.append(
                f"| {label(r)} | {n} | {r['sound_L'][n]:.2f} | {r['empirical_tau_max'][n]:.3f} | "
                f"{r['max_jacobian_norm'][n]:.3f} | {r['bound_over_tau'][n]:.0f} | {r['bound_over_jacobian'][n]:.0f} |"
            )
    return "\n".join(lines)


def same(r: Dict[str, Any], key: str) -> str:
    """CRMT: the per-sample ratio with both radii computed for one and the same a (joint only)."""
    if r["method"] != "crmt" or key != "joint":
        return "(same model)" if r["method"] == "jt" else "-"
    a, b = r["same_model_ratio_sound_step2"], r["same_model_ratio_empirical_step2"]
    return f"{a:.0f}x / {b:.0f}x" if a is not None and b is not None else "-"


def radius_table(results: List[Dict[str, Any]], modalities: Sequence[str]) -> str:
    keys = ("joint",) + tuple(modalities)
    lines = [
        "| model | perturbed | median sound radius | median empirical radius | median empirical / sound (per sample) "
        "| same a: median empirical / sound (a from sound step 2 / from empirical step 2) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for k in keys:
            ratio = r["empirical_over_sound_median"][k]
            lines.append(
                f"| {label(r)} | {k if k != 'joint' else '+'.join(modalities)} | "
                f"{r['median_radius']['sound'][k]:.4f} | {r['median_radius']['empirical'][k]:.3f} | "
                f"{'-' if ratio is None else f'{ratio:.0f}x'} | {same(r, k)} |"
            )
    return "\n".join(lines)


def tradeoff_table(results: List[Dict[str, Any]], modalities: Sequence[str], radii: Sequence[float]) -> str:
    show = [r for r in radii if r <= 0.1] or list(radii[:3])
    lines = [
        "| model | penalty | val acc | clean test acc (CRMT: after step 2, sound a / empirical a) | sound L ("
        + ", ".join(modalities)
        + ") | median sound radius | "
        + " | ".join(f"sound cert {r:g}" for r in show)
        + " | median empirical radius | empirical cert 1 |",
        "|---|---|---|---|---|---|" + "---|" * len(show) + "---|---|",
    ]
    for r in results:
        clean = r["clean_accuracy"]
        emp_at_1 = None
        if 1.0 in radii:
            emp_at_1 = r["curves"]["empirical"]["joint"][list(radii).index(1.0)]
        sound_at = [r["curves"]["sound"]["joint"][list(radii).index(x)] for x in show]
        if r["method"] == "crmt":
            after = r["clean_accuracy_after_step2"]
            clean_text = f"{pct(clean)} ({pct(after['sound'])} / {pct(after['empirical'])})"
        else:
            clean_text = pct(clean)
        lines.append(
            f"| {NAMES[r['method']]} | {r['penalty']:g} | {pct(r['val_accuracy'])} | {clean_text} | "
            + ", ".join(f"{r['sound_L'][n]:.1f}" for n in modalities)
            + f" | {r['median_radius']['sound']['joint']:.4f} | "
            + " | ".join(pct(a) for a in sound_at)
            + f" | {r['median_radius']['empirical']['joint']:.2f} | {pct(emp_at_1)} |"
        )
    return "\n".join(lines)


def check_table(results: List[Dict[str, Any]]) -> str:
    lines = ["| model | PGD budget = 0.99 x | flipped / attacked |", "|---|---|---|"]
    for r in results:
        for key, v in r["pgd_checks"].items():
            lines.append(f"| {label(r)} | {key} radius | {v['flipped']} / {v['attacked']} |")
    return "\n".join(lines)


def distance_table(results: List[Dict[str, Any]]) -> str:
    lines = [
        "| model | median PGD distance | / sound radius | / empirical radius | empirical radius > PGD distance "
        "| sound radius > PGD distance |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r.get("pgd_distance")
        if not d:
            continue
        fmt = lambda v, s="": "-" if v is None else f"{v:.2f}{s}"  # noqa: E731
        lines.append(
            f"| {label(r)} | {fmt(d['median'])} | {fmt(d['median_over_sound'], 'x')} | "
            f"{fmt(d['median_over_empirical'], 'x')} | "
            f"{d['empirical_radius_exceeds_pgd_distance']} / {d['attacked']} | "
            f"{d['sound_radius_exceeds_pgd_distance']} / {d['attacked']} |"
        )
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], modalities: Sequence[str], path: str, plot_penalty: Optional[float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("joint",) + tuple(modalities)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), sharey=True)
    colors = {("jt", 0): "tab:blue", ("crmt", 0): "tab:orange", ("jt", 1): "tab:green", ("crmt", 1): "tab:red"}
    chosen = [r for r in results if r["penalty"] == results[0]["penalty"]]
    if plot_penalty is not None:
        chosen += [r for r in results if r["penalty"] == plot_penalty and r["penalty"] != results[0]["penalty"]]
    for ax, key in zip(axes, keys):
        for r in chosen:
            extra = int(r["penalty"] != results[0]["penalty"])
            color = colors[(r["method"], extra)]
            for kind, style in (("sound", "-"), ("empirical", "--")):
                if extra and kind == "empirical":
                    continue
                radius = r["_certs"][kind].radius if key == "joint" else r["_certs"][kind].radius_per_modality[key]
                grid = torch.logspace(-3, 1, 400, dtype=torch.float64)
                acc = (radius.unsqueeze(0) >= grid.unsqueeze(1)).double().mean(1)
                ax.plot(grid.numpy(), 100 * acc.numpy(), style, color=color, label=f"{label(r)}, {kind}")
            if key == "joint" and "_distance" in r:
                acc = (r["_distance"].unsqueeze(0) >= grid.unsqueeze(1)).double().mean(1)
                ax.plot(
                    grid.numpy(), 100 * acc.numpy(), ":", color=color, label=f"{label(r)}, PGD-robust (upper bound)"
                )
        ax.set_xscale("log")
        ax.set_xlabel("l2 radius (normalised input units, log scale)")
        ax.set_title("all modalities perturbed" if key == "joint" else f"{key} perturbed alone")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("certified accuracy (%)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "AV digits, test split: certified accuracy, sound (solid) vs empirical (dashed); "
        "dotted: accuracy under PGD (bisection, an upper bound)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tradeoff(results: List[Dict[str, Any]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("jt", "tab:blue"), ("crmt", "tab:orange")):
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        xs = [r["median_radius"]["sound"]["joint"] for r in rs]
        ys = [100 * r["clean_accuracy"] for r in rs]
        ax.plot(xs, ys, "o-", color=color, label=NAMES[method])
        for r, xv, yv in zip(rs, xs, ys):
            ax.annotate(f"{r['penalty']:g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("median sound joint radius (normalised units)")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title("penalty weight (annotated) vs sound radius")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    full = load_av_digits(seed=args.data_seed)
    splits = type(full)(
        train=subset(full.train, args.limit),
        val=subset(full.val, args.limit),
        test=subset(full.test, args.limit),
        normalization=full.normalization,
        num_classes=full.num_classes,
        indices=full.indices,
    )
    shapes = dict(splits.feature_shapes)
    modalities = tuple(shapes)
    results = []
    for lam_index, lam in enumerate(args.penalties):
        for method in args.methods:
            t0 = time.time()
            model, crmt, info = train(method, lam, args, splits, shapes)
            info["train_seconds"] = time.time() - t0
            r = analyse(method, lam, model, crmt, info, args, splits, shapes, headline=lam_index == 0)
            if not args.quiet:
                print(
                    f"{label(r)}: clean {r['clean_accuracy']:.3f}, L {r['sound_L']}, median radius sound "
                    f"{r['median_radius']['sound']['joint']:.4f} / empirical "
                    f"{r['median_radius']['empirical']['joint']:.3f} "
                    f"(train {info['train_seconds']:.0f} s, analysis {r['seconds']:.0f} s)",
                    flush=True,
                )
            results.append(r)
    total = time.time() - started
    os.makedirs(args.out, exist_ok=True)
    figures = args.figures or args.out
    os.makedirs(figures, exist_ok=True)
    paths = [
        plot(results, modalities, os.path.join(figures, "certification_av.png"), args.plot_penalty),
        plot_tradeoff(results, os.path.join(figures, "certification_tradeoff.png")),
    ]
    headline = [r for r in results if r["penalty"] == args.penalties[0]]
    sections = [
        ("Certified accuracy (%) vs l2 radius", curve_table(headline, args.radii, modalities)),
        ("Median radii", radius_table(results, modalities)),
        ("Sound bound vs observed gradient norms", gap_table(results, modalities)),
        ("PGD sanity checks", check_table(results)),
        ("PGD minimal distance (bisection)", distance_table(headline)),
        ("Trade-off: LipschitzPenalty weight", tradeoff_table(results, modalities, args.radii)),
    ]
    conversion = next((r["conversion"] for r in results if r["method"] == "jt"), None)
    md = [
        f"# sound_certification ({total:.0f} s)\n",
        "command: python experiments/sound_certification.py " + " ".join(sys.argv[1:] if argv is None else argv) + "\n",
    ]
    md += [f"## {title}\n\n{table}\n" for title, table in sections]
    if conversion:
        md.append(f"JT -> CRMT head conversion: {json.dumps(conversion)}\n")
    text = "\n".join(md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {"args": vars(args), "seconds": total, "figures": paths, "results": clean},
            f,
            indent=1,
            default=lambda v: v.tolist() if isinstance(v, Tensor) else str(v),
        )
    if not args.quiet:
        print(text)
        print(f"wrote {args.out}/results.md, results.json, {', '.join(paths)}; total {total:.0f} s")
    return {"results": results, "seconds": total, "figures": paths, "markdown": text}


if __name__ == "__main__":
    main()
