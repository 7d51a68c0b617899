"""crmt_plugin.evaluation: how the model is called (call=), non-finite inputs, other batch layouts,
and the default (strong) and cheap presets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from crmt_plugin import CRMTError
from crmt_plugin.attacks import FGM, modality_means
from crmt_plugin.evaluation import evaluate_robustness, modality_report

from conftest import cnn_batch, cnn_model


class Positional(nn.Module):
    """forward(audio, image) -> (logits, features): needs call= to be evaluated."""

    def __init__(self):
        super().__init__()
        self.inner = cnn_model()

    def forward(self, audio, image):
        logits = self.inner(audio=audio, image=image)
        return logits, {"unused": logits.detach()}


def data(batches=2, size=12):
    return [cnn_batch(size, 5, seed=s) for s in range(batches)]


def call(model, inputs):
    return model(inputs["audio"], inputs["image"])[0]


def test_call_option_gives_the_same_numbers_as_the_plain_model():
    wrapped = Positional().eval()
    loader = data()
    ours = evaluate_robustness(wrapped, loader, {"FGM": FGM(0.5), "fast": "fast"}, radii=[0.5], call=call)
    plain = evaluate_robustness(wrapped.inner, loader, {"FGM": FGM(0.5), "fast": "fast"}, radii=[0.5])
    assert ours.rows == plain.rows and len(ours.rows) > 4
    report = modality_report(wrapped, loader, radius=0.5, attack="fast", call=call)
    reference = modality_report(wrapped.inner, loader, radius=0.5, attack="fast")
    assert report.per_modality == reference.per_modality
    with pytest.raises(CRMTError, match="output="):  # without call= its tuple output is refused, with the fix
        evaluate_robustness(wrapped, loader, "fast", radii=[0.5])
    with pytest.raises(CRMTError, match="call must be"):
        evaluate_robustness(wrapped, loader, None, call="audio")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_are_refused_naming_the_modality(bad):
    model = cnn_model().eval()
    loader = data()
    x, y = loader[1]
    x = dict(x)
    x["image"] = x["image"].clone()
    x["image"][3, 0, 2, 2] = bad
    loader[1] = (x, y)
    with pytest.raises(CRMTError, match=r"NaN or Inf.*\['image'\]"):
        evaluate_robustness(model, loader, None)
    with pytest.raises(CRMTError, match=r"\['image'\]"):
        modality_report(model, loader, attack="fast")


def test_modality_means_prepare_batch():
    loader = data(3)
    tuples = [(x["audio"], x["image"], y) for x, y in loader]  # another layout
    means = modality_means(tuples, prepare_batch=lambda b: ({"audio": b[0], "image": b[1]}, b[2]))
    reference = modality_means(loader)
    for n in ("audio", "image"):
        torch.testing.assert_close(means[n], reference[n], rtol=0, atol=0)
    assert set(modality_means(tuples, "image", prepare_batch=lambda b: ({"audio": b[0], "image": b[1]}, b[2]))) == {
        "image"}
    once = modality_means(tuples, max_batches=1, prepare_batch=lambda b: ({"audio": b[0], "image": b[1]}, b[2]))
    torch.testing.assert_close(once["audio"], loader[0][0]["audio"].mean(0))


def test_default_attack_is_the_strong_preset_and_fast_is_available():
    model = cnn_model().eval()
    loader = data(1, 8)
    strong = evaluate_robustness(model, loader, radii=[1.0], subsets=[("audio", "image")], missing=False)
    fast = evaluate_robustness(model, loader, "fast", radii=[1.0], subsets=[("audio", "image")], missing=False)
    assert {r["attack"] for r in strong.rows} == {"clean", "strong-l2"}
    assert {r["attack"] for r in fast.rows} == {"clean", "PGD-l2"}
    assert "WorstCase" in strong.attacks["strong-l2"]
    assert strong.accuracy("strong-l2", "audio+image", 1.0) <= fast.accuracy("PGD-l2", "audio+image", 1.0)
    report = modality_report(model, loader, radius=1.0)
    assert report.attack == "strong-l2"
    nothing = evaluate_robustness(model, loader)  # no radii: no attack rows
    assert {r["attack"] for r in nothing.rows} == {"clean", "missing (zeros)"}
    with pytest.raises(CRMTError, match="preset"):
        evaluate_robustness(model, loader, "strongest", radii=[1.0])
