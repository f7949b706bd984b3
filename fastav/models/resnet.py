"""A ResNet-18 pair for audio and video: MLA's CREMA-D encoders (and OGM-GE's before it), trained from scratch.

- ``AudioResNet18``: the fbank (B, T, F) as a one-channel image (B, 1, T, F), ResNet-18 with a one-channel stem,
  global average pooling: (B, 8 * width).
- ``VisualResNet18``: the frames (B, T, 3, H, W) folded into the batch, ResNet-18 with the usual three-channel
  stem, then the average over frames and positions (the official ``adaptive_avg_pool3d`` over (T, h, w)):
  (B, 8 * width).

``width`` is the stem's channel count (64 in the standard network, giving 512-d features); smaller widths serve
CPU runs. Initialisation as the official code: Kaiming-normal (fan_out) convolutions, BatchNorm weight 1 and
bias 0.

Deviation: MLA feeds its ResNet an unnormalised fbank; fastav's batches carry CAV-MAE's normalised fbank
((x + 5.081) / 4.4849), which only rescales the first convolution's input.

Shape suffixes: B batch, T frames (video) or fbank frames (audio), F mel bins, C channels, H/W pixels.

References: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Zhang et al., "Multimodal
Representation Learning by Alternating Unimodal Adaptation", CVPR 2024.
"""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or in_ch != out_ch:
            self.down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 without its classifier: (N, in_channels, H, W) -> (N, 8 * width, H / 32, W / 32)."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.out_dim = 8 * width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, ch = [], width
        for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(ch, out, stride), BasicBlock(out, out, 1)))
            ch = out
        self.layers = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


class AudioResNet18(nn.Module):
    """fbank (B, T, F) -> (B, 8 * width) features."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = ResNet18(1, width)
        self.out_dim = self.net.out_dim

    def forward(self, fbank_BTF: Tensor) -> Tensor:
        return self.net(fbank_BTF.unsqueeze(1)).mean(dim=(2, 3))


class VisualResNet18(nn.Module):
    """Frames (B, T, 3, H, W) -> (B, 8 * width) features, averaged over frames and positions."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = ResNet18(3, width)
        self.out_dim = self.net.out_dim

    def forward(self, video_BTCHW: Tensor) -> Tensor:
        B, T = video_BTCHW.shape[:2]
        maps = self.net(video_BTCHW.flatten(0, 1))  # (B * T, C, h, w)
        return maps.mean(dim=(2, 3)).view(B, T, -1).mean(dim=1)
