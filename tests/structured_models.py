"""Small models with the structured-pruning patterns, shared by test_pruning_groups and test_shrink."""

import torch
import torch.nn as nn


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.bn(self.conv(x)) + x))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # depthwise, multiplier 2
        self.gc = nn.Conv2d(8, 6, 3, padding=1, groups=2)  # 2 groups of 4 inputs -> 3 outputs
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(torch.relu(self.gc(x)), 1))


class HeadNormAttention(nn.Module):
    """Four heads of four; a per-head-dim scale shared by every head (like Qwen3's q_norm weight).
    ``fixed_heads``: the code hard-codes the head count, so a shrunk copy cannot run."""

    def __init__(self, fixed_heads=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.scale = nn.Parameter(torch.ones(4))
        self.heads = 4 if fixed_heads else -1

    def forward(self, x):
        def split(t):
            return t.view(*x.shape[:2], self.heads, 4).transpose(1, 2)

        q = split(self.q(x)) * self.scale
        out = torch.nn.functional.scaled_dot_product_attention(q, split(self.k(x)), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(*x.shape[:2], -1))
