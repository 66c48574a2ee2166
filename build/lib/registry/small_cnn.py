"""The small CNN Lantern trains in seconds on the CPU: demo models, tests and the shapes benchmarks."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_block(c_in: int, c_out: int, pool: bool, stride: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                               nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A four-block CNN that trains in seconds on the CPU on small images.

    The first convolution has stride 2 and the first three blocks max-pool, so a 64 px image becomes 4 x 4 features
    (an eighth of the first block's full-resolution cost, which dominated the training step on the CPU)."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        self.features = nn.Sequential(
            _conv_block(3, widths[0], pool=True, stride=2),
            _conv_block(widths[0], widths[1], pool=True),
            _conv_block(widths[1], widths[2], pool=True),
            _conv_block(widths[2], widths[3], pool=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
