"""The paper's three workloads: LeNet-5, a CIFAR-style ResNet-18 and LEAF's character LSTM.

Every model takes ``num_classes`` and the per-sample ``input_shape`` so the registry can
build any of them from a :class:`~apf_ray.data.Dataset` alone. Initialisation uses
PyTorch's defaults, drawn from the global RNG: the same ``torch.manual_seed`` gives the
same initial model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "CharLSTM", "LeNet5", "ResNet18"]


class LeNet5(nn.Module):
    """LeCun et al.'s LeNet-5 with ReLU and max pooling.

    conv 6@5x5 -> pool 2 -> conv 16@5x5 -> pool 2 -> fc 120 -> fc 84 -> fc num_classes.
    Designed for 32x32 inputs (16x5x5 features before fc 120); other sides >= 16 work,
    the flattened size follows from ``input_shape``.
    """

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 32, 32)) -> None:
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 16:
            raise ValueError(
                f"LeNet5 needs input_shape (channels, height, width) with sides >= 16, got {input_shape}"
            )
        channels, height, width = input_shape
        height, width = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2  # after conv-pool twice
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * height * width, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem without max pooling, BasicBlocks [2, 2, 2, 2]
    of 64/128/256/512 channels, global average pooling, one linear layer."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ResNet18 needs input_shape (channels, height, width), got {input_shape}")
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: embedding 8 -> 2-layer LSTM 256 -> linear over the vocabulary.

    Takes int64 token ids (batch, seq_len) and returns logits (batch, num_classes) for the
    character after the window, read from the last time step.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...] = (80,),
        embedding_dim: int = 8,
        hidden_size: int = 256,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"CharLSTM needs input_shape (seq_len,), got {input_shape}")
        self.embedding = nn.Embedding(num_classes, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.fc(out[:, -1])
