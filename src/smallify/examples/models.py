"""Reference architectures written here (torchvision cannot be used on the target machines)."""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions and a residual connection."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with basic blocks. ``stem='imagenet'`` is the 7x7/2 + max-pool stem of ResNet-18/34;
    ``stem='small'`` is one 3x3 convolution for 28x28 or 32x32 images."""

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), in_channels: int = 3,
                 num_classes: int = 1000, stem: str = "imagenet"):
        super().__init__()
        w0 = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True))
        layers, cin = [], w0
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 for 224x224 RGB images (the ImageNet layout)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), 3, num_classes, "imagenet")


def fmnist_resnet() -> ResNet:
    """The bundled Fashion-MNIST model: a small ResNet (three stages of two blocks) for 1x28x28 images."""
    return ResNet((2, 2, 2), (16, 32, 64), 1, 10, "small")
