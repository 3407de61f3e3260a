from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn

from dall_e.utils import Conv2d


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        make_conv = partial(Conv2d, device=device, requires_grad=requires_grad)
        self.id_path = make_conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", make_conv(n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", make_conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", make_conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", make_conv(self.n_hid, n_out, 1)),
        ]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    def __init__(self, group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                 device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        blk_range = range(n_blk_per_group)
        n_layers = group_count * n_blk_per_group
        make_conv = partial(Conv2d, device=device, requires_grad=requires_grad)
        make_blk = partial(EncoderBlock, n_layers=n_layers, device=device, requires_grad=requires_grad)
        self.blocks = nn.Sequential(OrderedDict([
            ("input", make_conv(input_channels, 1 * n_hid, 7)),
            ("group_1", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(1 * n_hid, 1 * n_hid)) for i in blk_range],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_2", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(1 * n_hid if i == 0 else 2 * n_hid, 2 * n_hid)) for i in blk_range],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_3", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(2 * n_hid if i == 0 else 4 * n_hid, 4 * n_hid)) for i in blk_range],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_4", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(4 * n_hid if i == 0 else 8 * n_hid, 8 * n_hid)) for i in blk_range]]))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", make_conv(8 * n_hid, vocab_size, 1, use_float16=False))]))),
        ]))

    def forward(self, x):
        return self.blocks(x.float())
