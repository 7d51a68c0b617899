"""BatchNorm: eval-mode bound, refusal in train mode, exact folding into the Conv/Linear before it."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from crmt_plugin.bounds import lipschitz_upper_bound
from crmt_plugin.errors import CRMTError
from test_bounds_reference import exact_operator_norm, randomise_bn

def test_batchnorm_eval_bound_and_train_mode_refused():
    gen = torch.Generator().manual_seed(0)
    bn = randomise_bn(nn.BatchNorm2d(5), gen)
    expected = (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max().item()
    assert lipschitz_upper_bound(bn, (5, 3, 3)) == pytest.approx(expected, rel=1e-5)
    assert lipschitz_upper_bound(bn, (5, 3, 3)) >= exact_operator_norm(bn, (5, 3, 3))
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).train()
    with pytest.raises(CRMTError, match=r"'1' \(BatchNorm1d\) is in training mode.*\.eval\(\)"):
        lipschitz_upper_bound(net, (4,))
    assert net.training and net[1].training                           # flags untouched
    no_stats = nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(CRMTError, match="track_running_stats=False"):
        lipschitz_upper_bound(no_stats, (4,))


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(2, 5, 3, stride=2, padding=1), (2, 7, 7)), (nn.Conv1d(3, 4, 3, padding=1), (3, 9)),
    (nn.Linear(6, 4), (6,)),
])
def test_batchnorm_after_conv_or_linear_is_folded_exactly(conv, shape):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    bn = randomise_bn((nn.BatchNorm1d if conv.weight.dim() <= 3 else nn.BatchNorm2d)(conv.weight.shape[0]), gen)
    pair = nn.Sequential(conv, bn).double().eval()
    layers = {}
    bound = lipschitz_upper_bound(pair, shape, per_layer=layers)
    exact = exact_operator_norm(pair, shape)
    assert list(layers) == ["0+1"]
    assert exact <= bound <= exact * (1 + 1e-3)
    out_shape = tuple(conv(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    assert bound <= lipschitz_upper_bound(conv, shape) * lipschitz_upper_bound(bn, out_shape)
    with pytest.raises(CRMTError, match=r"'1' \(BatchNorm"):
        lipschitz_upper_bound(nn.Sequential(conv, type(bn)(7)).eval(), shape)     # wrong channel count
