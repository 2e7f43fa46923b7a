"""Model registry: classifiers, generators and discriminators built by name.

Configs name models (``build_classifier("cnn", width=0.5, ...)``) so that heterogeneity is a
config value, not a code path. Every classifier exposes ``features(x)`` (the penultimate
representation, used for prototypes) and ``head`` (the final linear layer, used by the experts
on prototypes); ``forward(x) == head(features(x))``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ImageShape = tuple[int, int, int]  # (channels, height, width)


@dataclass(frozen=True)
class Units:
    """One dimension of a weight that runs over a layer's units (channels or neurons).

    ``group`` names the layer whose units they are (every tensor that reads or writes those
    units names the same group, so a sub-model keeps the same units everywhere); ``block`` is
    how many entries one unit spans along this dimension (a conv channel flattened into a dense
    layer spans ``height x width`` input columns).
    """

    group: str
    block: int = 1


# Per state-dict key, one entry per dimension: the Units it runs over, or None for a dimension a
# sub-model keeps whole (input image channels, kernel taps, the classes of the head).
WidthPlan = dict[str, tuple[Units | None, ...]]


class Classifier(nn.Module):
    """A feature extractor followed by a linear head."""

    feature_dim: int
    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def width_plan(self) -> WidthPlan | None:
        """How width sub-models are cut from this model (``common.submodels``); None when this
        architecture has no plan, and width tiers cannot use it."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Channels-last activations: on CPU this torch's NCHW max-pool and BatchNorm kernels are
    several times slower (measured: 10k-image evaluation 2.9 s -> 0.8 s, a train step 25 -> 16
    ms). Only the activation layout changes; build_classifier lays the weights out to match."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class SmallCNN(Classifier):
    """Two conv blocks (conv-BN-ReLU-pool) and one hidden dense layer: the MNIST-family workhorse.

    BatchNorm is there on purpose: experts average its running statistics and the generator's
    inversion loss matches them.
    """

    def __init__(self, in_shape: ImageShape, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        channels, height, width_px = in_shape
        c1, c2, hidden = (max(1, round(n * width)) for n in (32, 64, 128))
        self.body = nn.Sequential(
            nn.Conv2d(channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (height // 4) * (width_px // 4), hidden),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)
        self._pixels_after_pooling = (height // 4) * (width_px // 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_channels_last(x))

    def width_plan(self) -> WidthPlan:
        """conv1 -> BN1 -> conv2 -> BN2 -> flatten -> dense -> head. The flatten makes each
        conv2 channel a block of ``(H/4) * (W/4)`` input columns of the dense layer."""
        c1, c2, hidden = Units("conv1"), Units("conv2"), Units("dense")
        plan: WidthPlan = {"body.0.weight": (c1, None, None, None)}
        for bn, units in (("body.1", c1), ("body.5", c2)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                plan[f"{bn}.{name}"] = (units,)
            plan[f"{bn}.num_batches_tracked"] = ()
        plan["body.4.weight"] = (c2, c1, None, None)
        plan["body.9.weight"] = (hidden, Units("conv2", self._pixels_after_pooling))
        plan["body.9.bias"] = (hidden,)
        plan["head.weight"] = (None, hidden)
        plan["head.bias"] = (None,)
        return plan


class BasicBlock(nn.Module):
    """The ResNet basic block (two 3x3 convs and a shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(Classifier):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as in the paper's code."""

    def __init__(self, in_shape: ImageShape, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)]
        layers: list[nn.Module] = [
            nn.Conv2d(in_shape[0], planes[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(planes[0]),
            nn.ReLU(inplace=True),
        ]
        in_planes = planes[0]
        for index, p in enumerate(planes):
            for block_stride in (1 if index == 0 else 2, 1):
                layers.append(BasicBlock(in_planes, p, block_stride))
                in_planes = p
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_channels_last(x))


class SmallResNet(Classifier):
    """A ResNet-8 for small images: a 3x3 stem and three basic blocks (16, 32, 64 channels, the
    last two at stride 2), global average pooling. A second convolutional family beside the
    CNN, with shortcuts and BatchNorm everywhere, for federations of mixed architectures."""

    def __init__(self, in_shape: ImageShape, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        planes = [max(1, round(p * width)) for p in (16, 32, 64)]
        self.body = nn.Sequential(
            nn.Conv2d(in_shape[0], planes[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(planes[0]),
            nn.ReLU(inplace=True),
            BasicBlock(planes[0], planes[0], 1),
            BasicBlock(planes[0], planes[1], 2),
            BasicBlock(planes[1], planes[2], 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = planes[2]
        self.head = nn.Linear(planes[2], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_channels_last(x))


class MLP(Classifier):
    """Two hidden dense layers (256, 128) on the flattened image, no BatchNorm: the model a
    client without convolution support runs, and the family whose parameters share nothing
    with the others (DENSE's BatchNorm-matching term has nothing to read in it)."""

    def __init__(self, in_shape: ImageShape, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        channels, height, width_px = in_shape
        h1, h2 = (max(1, round(n * width)) for n in (256, 128))
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width_px, h1),
            nn.ReLU(inplace=True),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = h2
        self.head = nn.Linear(h2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


_CLASSIFIERS: dict[str, Callable[..., Classifier]] = {
    "cnn": SmallCNN,
    "mlp": MLP,
    "resnet8": SmallResNet,
    "resnet18": CifarResNet18,
}


def classifier_names() -> list[str]:
    """Names accepted by :func:`build_classifier` (the config schema checks against these)."""
    return sorted(_CLASSIFIERS)


def supports_width_tiers(name: str) -> bool:
    """Whether classifier ``name`` has a width plan, so clients can train its sub-models."""
    return _CLASSIFIERS[name].width_plan is not Classifier.width_plan


def build_classifier(
    name: str, *, num_classes: int, in_shape: ImageShape, width: float = 1.0
) -> Classifier:
    """Build a registered classifier; ``width`` scales every layer's channel count.

    Weights are laid out channels-last, like the activations (see :func:`_channels_last`);
    state dicts leaving the process are made contiguous by ``common.wire``.
    """
    if name not in _CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; known: {classifier_names()}")
    model = _CLASSIFIERS[name](in_shape=in_shape, num_classes=num_classes, width=width)
    return model.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class GeneratorSpec:
    """What a server needs to rebuild a client's generator from its uploaded weights."""

    latent_dim: int
    image_shape: ImageShape
    base_channels: int = 32

    def at_rate(self, rate: float) -> GeneratorSpec:
        """The generator of a client training a width-``rate`` sub-model: its channels scaled
        like the classifier's, so a small client's upload stays in proportion to its model."""
        return GeneratorSpec(
            self.latent_dim, self.image_shape, max(1, round(self.base_channels * rate))
        )


class Generator(nn.Module):
    """DCGAN-style generator: z -> dense -> two stride-2 transposed convs -> tanh image.

    Output is in [-1, 1]; map it with :func:`common.data.generator_to_classifier_input` before a
    classifier sees it.
    """

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        channels, height, width = spec.image_shape
        if height % 4 or width % 4:
            raise ValueError(f"generator needs image sides divisible by 4, got {height}x{width}")
        c = spec.base_channels
        self.spec = spec
        self.start_shape = (2 * c, height // 4, width // 4)
        self.project = nn.Sequential(
            nn.Linear(spec.latent_dim, 2 * c * (height // 4) * (width // 4), bias=False),
            nn.BatchNorm1d(2 * c * (height // 4) * (width // 4)),
            nn.ReLU(inplace=True),
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c, channels, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.project(z).view(-1, *self.start_shape))

    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Draw ``n`` images; the latent is standard normal, as in DCGAN."""
        device = device or next(self.parameters()).device
        return self(torch.randn(n, self.spec.latent_dim, device=device))


class Discriminator(nn.Module):
    """DCGAN-style discriminator returning one real/fake logit per image."""

    def __init__(self, image_shape: ImageShape, base_channels: int = 32) -> None:
        super().__init__()
        channels, height, width = image_shape
        c = base_channels
        self.net = nn.Sequential(
            nn.Conv2d(channels, c, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
            nn.Linear(2 * c * (height // 4) * (width // 4), 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def build_generator(spec: GeneratorSpec) -> Generator:
    """Build the generator described by ``spec`` (server and client use the same call)."""
    return Generator(spec)


def build_discriminator(image_shape: ImageShape, base_channels: int = 32) -> Discriminator:
    """Build the discriminator that trains alongside a client's generator (never uploaded)."""
    return Discriminator(image_shape, base_channels)


def fused_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every Conv2d directly followed by a BatchNorm2d inside an
    ``nn.Sequential`` is one convolution (torch's ``fuse_conv_bn_eval``), the BatchNorm an
    identity.

    In eval mode a BatchNorm is a per-channel affine map, so the copy computes the same
    function up to float rounding, without the normalisation's forward and backward passes: a
    frozen CNN's input gradient (what a generator step asks of the client's classifier) took 15
    instead of 24 ms per batch of 64. Only ``nn.Sequential`` is rewritten, where the order of
    the children is the order of the computation; other pairs (a ResNet block's) stay as they
    are. The copy is in eval mode and must stay there: its statistics are baked in.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for first, second in itertools.pairwise(list(module._modules)):
            conv, norm = module._modules[first], module._modules[second]
            if (
                isinstance(conv, nn.Conv2d)
                and type(norm) is nn.BatchNorm2d
                and norm.running_mean is not None
            ):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return fused
