"""Weight layouts: channels-last detection by strides (1x1 kernels included), NCHW copies and swaps."""

from __future__ import annotations

import torch
from torch import nn

from dragrt.runtime.models.layout import nchw_weights, non_nchw_weights, to_nchw_


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Linear(4, 4))


def test_a_channels_last_1x1_kernel_is_found_although_it_passes_is_contiguous() -> None:
    net = _net().to(memory_format=torch.channels_last)
    one_by_one = net[1].weight
    assert one_by_one.is_contiguous()  # why strides are compared, not is_contiguous()
    assert non_nchw_weights(net) == [net[0].weight, one_by_one]
    x = torch.randn(1, 8, 5, 5)  # NCHW
    assert not net[1](x).is_contiguous()  # the 1x1 convolution answers in channels-last
    assert to_nchw_(net) is net
    assert non_nchw_weights(net) == []
    assert net[1](x).is_contiguous()


def test_nchw_weights_swaps_in_copies_and_gives_back_the_same_storages() -> None:
    net = _net().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 5, 5)
    before = net[1](net[0](x))
    ptrs = [q.data_ptr() for q in net.parameters()]
    with nchw_weights(net):
        assert non_nchw_weights(net) == []
        inside = net[1](net[0](x))
        assert inside.is_contiguous()
    assert [q.data_ptr() for q in net.parameters()] == ptrs
    assert len(non_nchw_weights(net)) == 2
    torch.testing.assert_close(inside, before)
