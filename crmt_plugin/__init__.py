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
``datasets`` and ``models`` (the real offline data and reference models of the examples).
"""

from .certify import Certificate
from .errors import CRMTError
from .head import CRMTHead
from .integration import IntegrationResult
from .lipschitz import LipschitzConstants
from .loss import crmt_loss, margin_loss
from .wrapper import CRMTOutput, CRMTWrapper

__version__ = "0.1.0"

__all__ = [
    "CRMTWrapper",
    "CRMTOutput",
    "CRMTHead",
    "crmt_loss",
    "margin_loss",
    "LipschitzConstants",
    "Certificate",
    "IntegrationResult",
    "CRMTError",
]
