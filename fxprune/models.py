"""Built-in models and the model-spec resolver used by the CLI.

The built-ins are the CIFAR-10 ResNets of He et al. (2016, section 4.2) that
DepGraph's headline table prunes: three stages of ``n`` BasicBlocks with
16/32/64 channels, depth ``6n + 2``. Where a block changes shape, the shortcut
is a 1x1 convolution + BatchNorm (option B), so every layer is an ordinary
module that torch.fx traces.

A model spec is one of

- a built-in name: ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
  ``resnet110``;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``;
- ``package.module:factory``: imported and called with no arguments (the
  factory may be a dotted attribute path such as ``mod:Class.create``).

Examples
--------
>>> import torch
>>> net = resolve_model("resnet20").eval()
>>> net(torch.zeros(default_input_shape("resnet20"))).shape
torch.Size([1, 10])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from fxprune.errors import ConfigError

__all__ = [
    "BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56",
    "resnet110", "BUILTIN_MODELS", "resolve_model", "default_input_shape",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    The shortcut is the identity, or a 1x1 conv + BN when the stride or the
    channel count changes (option B of He et al.).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with three stages of `blocks_per_stage` blocks.

    Parameters
    ----------
    blocks_per_stage : int
        ``n`` in depth ``6n + 2``.
    num_classes : int
        Width of the final linear layer.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        if blocks_per_stage < 1 or num_classes < 1:
            raise ConfigError(
                f"CifarResNet needs blocks_per_stage >= 1 and num_classes >= 1, "
                f"got {blocks_per_stage} and {num_classes}"
            )
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27M parameters)."""
    return CifarResNet(3, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, 0.47M parameters)."""
    return CifarResNet(5, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage, 0.66M parameters)."""
    return CifarResNet(7, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.86M parameters)."""
    return CifarResNet(9, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage, 1.73M parameters)."""
    return CifarResNet(18, num_classes)


BUILTIN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
}

_SYNTAX = (
    "a model spec is a built-in name ({builtins}), 'torchvision:NAME' "
    "(e.g. torchvision:resnet50) or 'package.module:factory' (called with no arguments)"
)


def _syntax() -> str:
    return _SYNTAX.format(builtins=", ".join(BUILTIN_MODELS))


def _resolve_torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ConfigError(
            f"model spec 'torchvision:{name}' needs torchvision; "
            "install it with: pip install torchvision"
        ) from exc
    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError as exc:
        raise ConfigError(
            f"torchvision has no model {name!r}; "
            "torchvision.models.list_models() lists the names"
        ) from exc


def _resolve_factory(spec: str) -> nn.Module:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"model spec {spec!r} is malformed; {_syntax()}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import {module_name!r} for model spec {spec!r} ({exc}); "
            "check the module path and that it is on PYTHONPATH"
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"{module_name!r} has no attribute {attr_path!r} (model spec {spec!r})"
            ) from None
    if not callable(target):
        raise ConfigError(f"{spec!r} names a {type(target).__name__}, not a callable factory")
    model = target()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def resolve_model(spec: str) -> nn.Module:
    """Build the model that `spec` names.

    Parameters
    ----------
    spec : str
        A built-in name, ``torchvision:NAME`` or ``package.module:factory``.

    Returns
    -------
    torch.nn.Module
        A freshly initialized model (in training mode, as constructed).

    Raises
    ------
    ConfigError
        If the spec is malformed or names nothing that exists; the message
        lists the built-ins and the syntax.

    Examples
    --------
    >>> type(resolve_model("resnet56")).__name__
    'CifarResNet'
    >>> type(resolve_model("torch.nn:Identity")).__name__
    'Identity'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty model spec; {_syntax()}")
    spec = spec.strip()
    if spec.lower() in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec.lower()]()
    prefix, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(f"unknown model {spec!r}; {_syntax()}")
    if prefix == "torchvision":
        if not rest:
            raise ConfigError(f"model spec {spec!r} names no model; {_syntax()}")
        return _resolve_torchvision(rest)
    return _resolve_factory(spec)


def default_input_shape(spec: str) -> tuple[int, ...]:
    """Return the example input shape that suits the model `spec` names.

    ``(1, 3, 32, 32)`` for the CIFAR built-ins, ``(1, 3, 299, 299)`` for
    ``torchvision:inception_v3`` and ``(1, 3, 224, 224)`` otherwise.

    Examples
    --------
    >>> default_input_shape("resnet56"), default_input_shape("torchvision:vgg16")
    ((1, 3, 32, 32), (1, 3, 224, 224))
    """
    spec = spec.strip()
    if spec.lower() in BUILTIN_MODELS:
        return (1, 3, 32, 32)
    if spec == "torchvision:inception_v3":
        return (1, 3, 299, 299)
    return (1, 3, 224, 224)


def calibrate_batchnorm(model: nn.Module, example: torch.Tensor, batches: int, *, batch_size: int = 4,
                        seed: int = 0) -> nn.Module:
    """Recompute every BatchNorm's running statistics (a cumulative average) on ``batches``
    random normal batches shaped like ``example``, in place; returns the model in eval
    mode. An untrained model (``weights=None``) whose default statistics shrink its
    activations to nothing gets outputs the oracle can compare. For random models only:
    on a trained one it replaces the statistics learned from data."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    if bns and batches:
        model.train()
        with torch.no_grad():
            for _ in range(batches):
                if example.is_floating_point():
                    model(torch.randn((batch_size, *example.shape[1:]), generator=gen, dtype=example.dtype))
                else:  # token ids
                    model(torch.randint(0, int(example.max()) + 1, (batch_size, *example.shape[1:]), generator=gen))
    return model.eval()
