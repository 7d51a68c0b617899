"""1-Lipschitz convolutions: AOL-rescaled ``Conv1d`` / ``Conv2d`` (zero padding, any stride and dilation).

    y = conv(x, K diag_c(d)) + b,   d_c = (sum_{c', s} |G[c, c', s]|)^(-1/2),
    G[c, c', s] = sum_o sum_t K[o, c, t] K[o, c', t + s]            (the kernel's autocorrelation)

Input (B, c_in, *spatial), output (B, c_out, *spatial'). The rescaled convolution is 1-Lipschitz on every
input size (:mod:`~crmt_plugin.lipschitz_layers.rescaling`); the bounds rule returns the smaller of the AOL
certificate of the effective kernel and the convolution's exact operator norm on the actual input shape.

    >>> import torch
    >>> conv = AOLConv2d(3, 8, 3, stride=2, padding=1)
    >>> conv(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 8, 8, 8])
    >>> AOLConv1d(13, 16, 3, padding=1)(torch.randn(2, 13, 32)).shape
    torch.Size([2, 16, 32])
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CRMTError
from .rescaling import aol_conv_scale

__all__ = ["AOLConvNd", "AOLConv1d", "AOLConv2d"]

IntOrTuple = Union[int, Tuple[int, ...]]


def _tuple(value: IntOrTuple, dims: int, what: str) -> Tuple[int, ...]:
    out = (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != dims or any(v < 0 for v in out):
        raise CRMTError(f"{what} must be an int >= 0 or {dims} of them, found {value!r}")
    return out


class AOLConvNd(nn.Module):
    """The shared implementation of :class:`AOLConv1d` / :class:`AOLConv2d` (``dims`` spatial dimensions).

    ``weight`` (c_out, c_in, k...) is free; ``effective_weight()`` is what the forward applies. Zero padding
    only (``padding`` an int per dim): reflect/replicate padding copies inputs and is not 1-Lipschitz.
    """

    dims = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple = 0, dilation: IntOrTuple = 1, bias: bool = True) -> None:
        super().__init__()
        if self.dims not in (1, 2):
            raise CRMTError("use AOLConv1d or AOLConv2d")
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise CRMTError(f"channels must be >= 1, found in={in_channels}, out={out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _tuple(kernel_size, self.dims, "kernel_size")
        self.stride = _tuple(stride, self.dims, "stride")
        self.padding = _tuple(padding, self.dims, "padding")
        self.dilation = _tuple(dilation, self.dims, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise CRMTError("kernel_size, stride and dilation must be >= 1")
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, *self.kernel_size))
        nn.init.orthogonal_(self.weight.view(self.out_channels, -1))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels))
        else:
            self.register_parameter("bias", None)

    def effective_weight(self) -> Tensor:
        """K diag_c(d) (c_out, c_in, k...), the kernel the forward applies (1-Lipschitz as a convolution)."""
        scale = aol_conv_scale(self.weight)
        return self.weight * scale.view(1, -1, *([1] * self.dims))

    def conv_function(self):
        """``F.conv1d`` or ``F.conv2d``."""
        return F.conv1d if self.dims == 1 else F.conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_function()(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation)

    def as_plain(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        """An ``nn.Conv1d`` / ``nn.Conv2d`` (no bias, ``dtype``) holding the effective kernel: the same linear map."""
        cls = nn.Conv1d if self.dims == 1 else nn.Conv2d
        plain = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, bias=False, dtype=dtype, device=self.weight.device)
        with torch.no_grad():
            plain.weight.copy_(self.effective_weight().detach().to(dtype))
        return plain

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")


class AOLConv1d(AOLConvNd):
    """1-Lipschitz ``Conv1d``: input (B, c_in, T), output (B, c_out, T')."""

    dims = 1


class AOLConv2d(AOLConvNd):
    """1-Lipschitz ``Conv2d``: input (B, c_in, H, W), output (B, c_out, H', W')."""

    dims = 2
