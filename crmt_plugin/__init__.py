"""crmt_plugin: Certifiable Robust Multi-modal Training for any PyTorch late-fusion model.

Example::

    import crmt_plugin
    crmt = crmt_plugin.CRMTWrapper(model, example_inputs=batch)   # head, modalities found; structure checked
    crmt = crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities={"audio": 512, "visual": 512})
    out = crmt(inputs)                                  # out.logits, out.unimodal[name]
    loss = crmt_plugin.crmt_loss(out, y, rho=2.0)
    lip = crmt.estimate_lipschitz(loader)               # empirical: cert.sound is False
    crmt.fit_integration(loader, lipschitz=lip)         # step 2: only a^(m) changes
    cert = crmt.certify(inputs, y, lipschitz=lip)       # cert.radius, cert.radius_per_modality
    cert.certified({"audio": 0.5, "visual": 0.2})       # (B,) bool: both perturbed at once

Submodules: ``attacks`` (FGM/PGD per modality, missing modality), ``evaluation`` (robustness
tables and plots), ``bounds`` (sound encoder Lipschitz bounds), ``structure`` (the late-fusion
check), ``testing`` (``check_certificates``: attack every certified sample inside its radius),
``datasets`` and ``models`` (the real offline data and reference models of the examples),
``distributed``, ``benchmark`` (``crmt-benchmark``) and ``lightning`` (``CRMTCallback``). Each
is imported on first use: ``import crmt_plugin`` is enough for ``crmt_plugin.attacks.PGD``.
"""

from .certified_loss import certified_loss, lipschitz_margin_loss
from .certify import Certificate
from .errors import CRMTError
from .head import CRMTHead
from .integration import IntegrationResult
from .lipschitz import LipschitzConstants
from .loss import crmt_loss, margin_loss
from .wrapper import CRMTOutput, CRMTWrapper

__version__ = "0.1.0"

# Public submodules, imported on first attribute access (PEP 562, as numpy and scipy do): ``import
# crmt_plugin`` is enough for ``crmt_plugin.attacks.PGD``, and nothing optional is imported early.
SUBMODULES = ("attacks", "benchmark", "bounds", "datasets", "distributed", "evaluation", "lightning",
              "lipschitz_layers", "models", "selection", "structure", "testing")


def __getattr__(name: str):
    if name in SUBMODULES:
        import importlib

        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))


__all__ = [
    "CRMTWrapper",
    "CRMTOutput",
    "CRMTHead",
    "crmt_loss",
    "margin_loss",
    "certified_loss",
    "lipschitz_margin_loss",
    "LipschitzConstants",
    "Certificate",
    "IntegrationResult",
    "CRMTError",
]
