"""Sound upper bounds of the l2 Lipschitz constant of encoders, and a penalty to keep them small.

    >>> import torch
    >>> from torch import nn
    >>> enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 16)).eval()
    >>> L = lipschitz_upper_bound(enc, (1, 8, 8))       # one sample's shape, no batch dim
    >>> # for all x, y of shape (1, 8, 8):  ||enc(x) - enc(y)||_2 <= L * ||x - y||_2
    >>> lip = encoder_bounds({"image": enc, "audio": nn.Linear(13, 16)}, {"image": (1, 8, 8), "audio": (13,)})
    >>> lip.sound, lip.source                           # LipschitzConstants, values (M,)
    (True, 'bound')

The bound is a product (and, for residual/branching graphs, a sum) of per-layer bounds, each a
*guaranteed* upper bound of that layer's l2 operator norm / Lipschitz constant on the actual input
shape, computed in float64 and rounded upwards (:mod:`~crmt_plugin.bounds.rounding`):

=====================  ==========================================================================
layer                  per-layer bound (proof sketch in the module that computes it)
=====================  ==========================================================================
Linear                 ||W||_2 (float64 SVD, + 1e-6 relative)                         ``linear.py``
Conv1d/2d/3d,          operator norm of the convolution *with* its stride, padding (any mode),
ConvTranspose1d/2d/3d  dilation and groups on the given input shape: exact (Gram matrix of the
                       operator + float64 eigensolver) when the smaller side has <= ``dense_max``
                       entries, else the Fourier bound of a circulant embedding (sound, slightly
                       larger). Never the spectral norm of the reshaped kernel.       ``conv.py``
BatchNorm (eval)       right after a Conv/Linear: folded in (exact norm of the pair diag(s) A, where
                       s = gamma / sqrt(running_var + eps)); alone: max_c |s_c|. Train mode: refused
                                                                                      ``norm.py``
AvgPool, Adaptive-     exact operator norm of the (per-channel) averaging operator, e.g.
AvgPool                1/sqrt(H W) for global average pooling                         ``pooling.py``
MaxPool, Adaptive-     sqrt(max number of pooling windows that contain one input element)
MaxPool                (1 for non-overlapping windows, 2 for 3x3 stride-2 2-D windows)
ReLU, Tanh, ...        sup |f'|: ReLU/Tanh/Softplus/... 1, LeakyReLU max(1, |slope|),
                       GELU 1.1289, SiLU 1.0998, Mish 1.0885, Sigmoid 1/4, Hardswish 3/2,
                       ELU max(1, alpha), SELU 1.7581, Softmax 1                      ``activations.py``
Dropout                1 (in train mode: 1/(1-p))                                     ``dropout.py``
Flatten, Identity,     1; traced ``+``, ``*``, ``cat``, ``view``, slicing, ``mean``, ...  ``tensor_ops.py``
tensor operations
Sequential             product of its layers' bounds (shapes tracked through the layers) ``graph.py``
Residual(branch)       L(shortcut) + L(branch), i.e. 1 + L(branch) for x + branch(x)
crmt_plugin.           AOLLinear / AOLConv1d / AOLConv2d: exact norm of the effective weight (<= 1);
lipschitz_layers       MaxMin, L2NormPool 1; ModalityScale 1 / min(s); ConvexResidual
                       (1 - a) + a L(f)                                      ``lipschitz_layers.py``
other modules          traced with torch.fx: x + f(x), cat, flatten/view, slicing, mean, F.relu, ...
                       are understood; anything else is refused with a CRMTError
=====================  ==========================================================================

**Every unsupported layer is listed at once** (paths and types, :func:`unsupported_layers`), in one
:class:`~crmt_plugin.errors.CRMTError`. Give such a layer a bound in one of two ways:

* :func:`declare_lipschitz` -- a number (or a callable ``(module, input_shape) -> float``) for one
  instance or one exact type, trusted as given;
* :func:`lipschitz_rule` -- register a rule for your own layer type, exactly as the built-in layers are
  registered (one decorated function per layer family, :mod:`~crmt_plugin.bounds.registry`)::

      from crmt_plugin.bounds import lipschitz_rule

      class Scale(nn.Module):                          # y = c x
          def __init__(self, c):
              super().__init__()
              self.c = c

          def forward(self, x):
              return self.c * x

      @lipschitz_rule(Scale)
      def scale_rule(layer, site):                     # site: LayerSite(path, in_shape, out_shape, ctx)
          return abs(layer.c)                          # a sound upper bound (float >= 0) ...
                                                       # ... or a Plan (bound + differentiable estimate)

  The rule is used by the module walk, inside traced forwards and by the unsupported-layer check;
  ``replace=True`` overrides an existing rule, :func:`remove_lipschitz_rule` removes one.

In either case the certificate is only as sound as the rule or declaration. The bound is for the
mathematical function computed by the module in exact arithmetic (float32 rounding of the forward pass
is not covered) and assumes forward hooks do not change outputs.

To *train* encoders whose bounds are small enough for non-trivial sound radii, add
:class:`LipschitzPenalty` (a differentiable estimate of the same product) to the loss.

Modules: ``rounding`` (upward arithmetic), ``plan`` (compiled plans), ``registry`` (rules and declarations),
``dense`` (dense operator norms), one module per layer family (``linear``, ``conv``, ``norm``,
``activations``, ``pooling``, ``dropout``, ``tensor_ops``), ``graph`` (composition and the
unsupported-layer check), ``traced`` (torch.fx), ``penalty`` and ``upper_bound`` (the entry points).
"""

from __future__ import annotations

# the layer families register their rules on import: import them all before any walk
from . import activations, conv, dropout, linear, norm, pooling, tensor_ops  # noqa: F401
from . import lipschitz_layers  # noqa: F401, E402  (rules of crmt_plugin.lipschitz_layers; after graph's imports)
from .graph import Residual, unsupported_layers
from .penalty import LipschitzPenalty
from .registry import LayerSite, declare_lipschitz, lipschitz_rule, remove_lipschitz_rule
from .upper_bound import encoder_bounds, lipschitz_upper_bound

__all__ = [
    "lipschitz_upper_bound", "encoder_bounds", "declare_lipschitz", "Residual", "LipschitzPenalty",
    "lipschitz_rule", "remove_lipschitz_rule", "LayerSite", "unsupported_layers",
]
