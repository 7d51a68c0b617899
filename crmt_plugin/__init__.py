"""crmt_plugin: Certifiable Robust Multi-modal Training for any PyTorch late-fusion model.

    >>> import crmt_plugin
    >>> crmt = crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities={"audio": 512, "visual": 512})
    >>> out = crmt(inputs)                                  # out.logits, out.unimodal[name]
    >>> loss = crmt_plugin.crmt_loss(out, y, rho=2.0)
    >>> lip = crmt.estimate_lipschitz(loader)               # empirical: cert.sound is False
    >>> crmt.fit_integration(loader, lipschitz=lip)         # step 2: only a^(m) changes
    >>> cert = crmt.certify(inputs, y, lipschitz=lip)       # cert.radius, cert.radius_per_modality

Submodules: ``attacks`` (FGM/PGD per modality, missing modality), ``evaluation`` (robustness
tables and plots), ``bounds`` (sound encoder Lipschitz bounds), ``datasets`` and ``models`` (the
real offline data and reference models of the examples).
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
