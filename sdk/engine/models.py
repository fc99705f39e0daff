"""Architecture registry: rebuild a torch module from a manifest and safetensors.

Every architecture is split into a ``backbone`` (image -> features) and a
linear ``head`` (features -> logits). The package's weights are the state dict
of :class:`Classifier`, so tensor names are ``backbone.*`` and ``head.*``.
Vendors hand in the torchvision model's own state dict; :func:`from_vendor_state`
maps it (the head's module path becomes ``head``).

``timm:NAME`` architectures are built by timm (``pretrained=False``, offline,
never from code in the package) and split through timm's own API:
:class:`TimmBackbone` runs ``forward_head(forward_features(x), pre_logits=True)``
and the head is ``get_classifier()``; :func:`resolve_architecture` finds either kind.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from sourcefree.errors import PackageError, exception_summary
from sourcefree.package.manifest import TIMM_PREFIX, ArchitectureSpec, ArchOption, timm_options


class Classifier(nn.Module):
    """``backbone`` then linear ``head``; ``forward`` returns (logits, features)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.head(features), features


class SmallCNN(nn.Module):
    """Three conv blocks with BatchNorm and global average pooling, for 32-64 px inputs."""

    def __init__(self, num_classes: int = 7, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(3):
            out = width * 2**i
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Architecture:
    """A registered architecture and where its head sits."""

    name: str
    build: Callable[[int, int], nn.Module]
    """``build(num_classes, in_channels)`` -> the vendor-facing module (random init)."""
    head_path: str
    """Dotted path of the final nn.Linear inside the vendor-facing module ("" with ``split``)."""
    feature_dim: int
    """Width of the features; 0 for timm models (it depends on the options: see the head)."""
    first_conv: str
    """State-dict key of the first convolution's weight in the vendor-facing module.

    Its shape ``(out, in, kh, kw)`` gives the input channels; a weights dict's
    order is not the network's (safetensors files are sorted by dtype and name).
    """
    channels: tuple[int, ...] = (3,)
    """Input channel counts the architecture accepts."""
    min_size: int = 32
    description: str = ""
    split: Callable[[nn.Module], tuple[nn.Module, nn.Linear]] | None = None
    """``split(module)`` -> (backbone, head); None: the head at ``head_path`` becomes Identity."""
    options: Mapping[str, ArchOption] | None = None
    """timm only: the ``timm.create_model`` options the module is built with."""
    timm_version: str | None = None
    """timm only: the installed timm version that builds the module."""

    def split_module(self, module: nn.Module) -> tuple[nn.Module, nn.Linear]:
        """The vendor-facing module as (backbone, linear head), sharing its parameters."""
        return self.split(module) if self.split is not None else _split(module, self.head_path)


def _tv(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        import torchvision

        factory = getattr(torchvision.models, name)
        module: nn.Module = factory(weights=None, num_classes=num_classes)
        return module

    return build


def _small(num_classes: int, in_channels: int) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "resnet18",
            _tv("resnet18"),
            "fc",
            512,
            "conv1.weight",
            description="torchvision ResNet-18",
        ),
        Architecture(
            "resnet34",
            _tv("resnet34"),
            "fc",
            512,
            "conv1.weight",
            description="torchvision ResNet-34",
        ),
        Architecture(
            "resnet50",
            _tv("resnet50"),
            "fc",
            2048,
            "conv1.weight",
            description="torchvision ResNet-50",
        ),
        Architecture(
            "mobilenet_v3_small",
            _tv("mobilenet_v3_small"),
            "classifier.3",
            1024,
            "features.0.0.weight",
            description="torchvision MobileNetV3-Small (features after the 1024-d layer)",
        ),
        Architecture(
            "mobilenet_v3_large",
            _tv("mobilenet_v3_large"),
            "classifier.3",
            1280,
            "features.0.0.weight",
            description="torchvision MobileNetV3-Large (features after the 1280-d layer)",
        ),
        Architecture(
            "efficientnet_b0",
            _tv("efficientnet_b0"),
            "classifier.1",
            1280,
            "features.0.0.weight",
            description="torchvision EfficientNet-B0",
        ),
        Architecture(
            "smallcnn",
            _small,
            "fc",
            128,
            "features.0.weight",
            channels=(1, 3),
            min_size=8,
            description="3 conv blocks + BatchNorm + global pool, for 32-64 px faces",
        ),
    )
}


def get_architecture(name: str) -> Architecture:
    """Look up an architecture; unknown names get close matches and the full list.

    ``timm:NAME`` resolves with timm's default options (:func:`resolve_architecture`).
    """
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    close = difflib.get_close_matches(name, list(ARCHITECTURES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if _resolver(name) is not None:
        return resolve_architecture(name)
    raise PackageError(
        f"unknown architecture {name!r}",
        "it is not in this SDK's architecture registry",
        f"{hint}registered: {', '.join(sorted(ARCHITECTURES))}",
    )


def _split(module: nn.Module, head_path: str) -> tuple[nn.Module, nn.Linear]:
    parent_path, _, leaf = head_path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    head = getattr(parent, leaf)
    if not isinstance(head, nn.Linear):
        raise PackageError(
            f"{head_path} is not a linear layer", "the registry entry is wrong", "report a bug"
        )
    setattr(parent, leaf, nn.Identity())
    return module, head


def feature_map_split(backbone: nn.Module, arch: str) -> tuple[nn.Module, nn.Module]:
    """``(trunk, neck)`` of a registered architecture's backbone, sharing its modules.

    ``trunk(x)`` is the last feature map (N, C, h, w); ``neck(v)`` maps a
    spatially average-pooled map vector (N, C) to the ``features`` output, so
    ``backbone(x) == neck(trunk(x).mean((2, 3)))``. Methods with region
    branches (LA-CMFER's 2x2 grid) pool parts of the map themselves.

    Raises:
        PackageError: the architecture has no known split.
    """
    a = get_architecture(arch)
    if a.name == "smallcnn" and isinstance(backbone, SmallCNN):
        return nn.Sequential(*list(backbone.features)[:-2]), nn.Identity()
    if a.name.startswith("resnet"):
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return nn.Sequential(*(getattr(backbone, n) for n in names)), nn.Identity()
    if a.name.startswith(("mobilenet_v3", "efficientnet")):
        trunk, neck = backbone.features, backbone.classifier
        if isinstance(trunk, nn.Module) and isinstance(neck, nn.Module):
            return trunk, neck
    raise PackageError(
        f"no feature-map split for architecture {a.name!r}",
        "the method needs the last feature map before global pooling",
        "use smallcnn, a ResNet, MobileNetV3 or EfficientNet-B0",
    )


FamilyBuilder = Callable[[ArchitectureSpec], Classifier]
"""``build(spec)`` -> a randomly initialised model for a composite architecture name."""

_FAMILIES: dict[str, FamilyBuilder] = {}


def register_architecture_family(prefix: str, build: FamilyBuilder) -> None:
    """Let a method rebuild the composite models it exports, named ``<prefix>.<details>``.

    Adapted packages of methods that add layers to the source model (LA-CMFER's
    local branch) name such an architecture; :func:`load_classifier` finds the
    builder by the prefix (:func:`~sourcefree.engine.registry.load_builtin_methods` registers
    the built-in families).
    """
    _FAMILIES[prefix] = build


def _family(name: str) -> FamilyBuilder | None:
    prefix, dot, _ = name.partition(".")
    if not dot or name in ARCHITECTURES or _resolver(name) is not None:
        return None
    if prefix not in _FAMILIES:
        raise PackageError(
            f"architecture {name[:60]!r} names the family {prefix[:40]!r}, which is not registered",
            "the method that exported the model registers its family when the methods load",
            "call sourcefree.engine.registry.load_builtin_methods() first "
            "(the CLI and sourcefree.adapt do), or use a package of a registered method",
        )
    return _FAMILIES[prefix]


def build_classifier(
    arch: str | Architecture, num_classes: int, in_channels: int = 3
) -> Classifier:
    """A randomly initialised :class:`Classifier` of a registered architecture."""
    a = get_architecture(arch) if isinstance(arch, str) else arch
    if in_channels not in a.channels:
        raise PackageError(
            f"{a.name} takes {' or '.join(map(str, a.channels))}-channel input, not {in_channels}",
            "its first convolution is fixed",
            "use 3 channels (grey images are replicated to RGB), or the smallcnn architecture",
        )
    backbone, head = a.split_module(a.build(num_classes, in_channels))
    return Classifier(backbone, head)


def _check_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise PackageError(
            f"{what} does not match the architecture ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors; {first})",
            "the tensor names come from another architecture or class count",
            "pass weights saved from this architecture's own state_dict()",
        )
    out = {}
    for key, ref in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise PackageError(
                f"{what} tensor {key!r} has shape {list(t.shape)}, expected {list(ref.shape)}",
                "the weights belong to another configuration (class count, width)",
                "check --arch and --labels match how the model was trained",
            )
        if t.dtype != ref.dtype:
            if not (t.is_floating_point() and ref.is_floating_point()):
                raise PackageError(
                    f"{what} tensor {key!r} has dtype {t.dtype}, expected {ref.dtype}",
                    "integer and floating tensors are not interchangeable",
                    "save the model's own state_dict()",
                )
            t = t.to(ref.dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PackageError(
                f"{what} tensor {key!r} contains NaN or Inf",
                "a model with non-finite weights predicts garbage",
                "retrain or fix the weights",
            )
        out[key] = t
    return out


def from_vendor_state(
    arch: str | Architecture,
    state: Mapping[str, torch.Tensor],
    num_classes: int,
    in_channels: int = 3,
) -> Classifier:
    """Build a Classifier from the architecture's own (torchvision- or timm-style) state dict.

    The head's module path (``fc``, ``classifier``, ``head.fc``) becomes ``head``;
    weights of another model or configuration are refused (:class:`PackageError`).
    """
    a = get_architecture(arch) if isinstance(arch, str) else arch
    vendor = a.build(num_classes, in_channels)
    checked = _check_state(vendor, state, "the weights")
    vendor.load_state_dict(checked)
    backbone, head = a.split_module(vendor)
    return Classifier(backbone, head)


def first_conv_channels(arch: str | Architecture, state: Mapping[str, torch.Tensor]) -> int:
    """Input channels of vendor weights, read at the registry's first-convolution key.

    Never the first 4-D tensor of ``state``: a dict's order is not the network's.

    Raises:
        PackageError: the tensor is missing, is not a convolution weight, or
            takes a channel count the architecture does not accept.
    """
    a = get_architecture(arch) if isinstance(arch, str) else arch
    weight = state.get(a.first_conv)
    if weight is None:
        raise PackageError(
            f"the weights do not hold {a.first_conv!r}: the file does not match the "
            f"architecture {a.name}",
            f"{a.name} stores its first convolution under that name",
            "pass weights saved from this architecture's own state_dict(), or fix --arch",
        )
    if weight.ndim != 4:
        raise PackageError(
            f"the weights tensor {a.first_conv!r} has shape {list(weight.shape)[:8]}",
            f"{a.name}'s first convolution weight is 4-D (out, in, kh, kw)",
            "pass weights saved from this architecture's own state_dict()",
        )
    channels = int(weight.shape[1])
    if channels not in a.channels:
        raise PackageError(
            f"{a.name}'s first convolution {a.first_conv!r} takes {channels} input channels",
            f"{a.name} takes {' or '.join(map(str, a.channels))}-channel input",
            "export a model with one of those input channel counts"
            if 1 in a.channels
            else "train with grey images replicated to RGB, or use the smallcnn architecture",
        )
    return channels


def load_classifier(spec: ArchitectureSpec, weights: bytes) -> Classifier:
    """Rebuild a package's model from verified safetensors bytes (never torch.load).

    Registered architectures, ``timm:NAME`` ones (:func:`resolve_architecture`),
    and composite ones (``<family>.<details>``) whose family a method registered
    with :func:`register_architecture_family`.
    """
    from safetensors.torch import load as load_safetensors

    family = _family(spec.name)
    if family is not None:
        model = family(spec)
    else:
        model = build_classifier(resolve_architecture(spec), spec.num_classes, spec.in_channels)
    if model.head.in_features != spec.feature_dim:
        raise PackageError(
            f"architecture.feature_dim is {spec.feature_dim}",
            f"{spec.name} has {model.head.in_features} features",
            "re-export the package with the SDK",
        )
    state = load_safetensors(weights)
    model.load_state_dict(_check_state(model, state, "model.safetensors"))
    return model.eval()


def read_vendor_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a vendor's safetensors file; pickles and zips are refused by magic bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from sourcefree.package.weights import read_header

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PackageError(
            f"cannot read weights {str(p)!r}", exc.strerror or str(exc), "check the path"
        ) from None
    read_header(data, name=p.name)
    try:
        return load_safetensors(data)
    except SafetensorError as exc:
        raise PackageError(
            f"{p.name} is not a valid safetensors file", str(exc), "save it with safetensors"
        ) from None


class TimmBackbone(nn.Module):
    """A timm model up to its pre-logits features (its classifier replaced by Identity)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        out: torch.Tensor = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        return out


def import_timm() -> ModuleType:
    """timm with the Hugging Face hub switched offline first (nothing ever downloads)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import timm
    except ImportError:
        raise PackageError(
            "timm is not installed",
            "timm:NAME architectures are built by timm",
            "pip install 'sourcefree[adapt]'",
        ) from None
    return timm


def _timm_split(model_name: str) -> Callable[[nn.Module], tuple[nn.Module, nn.Linear]]:
    def split(module: nn.Module) -> tuple[nn.Module, nn.Linear]:
        head = module.get_classifier()  # type: ignore[operator]
        if not isinstance(head, nn.Linear):
            raise PackageError(
                f"the timm model {model_name!r} has a {type(head).__name__} classifier",
                "a package's head is one linear layer (features -> logits)",
                "use a timm model whose get_classifier() is an nn.Linear",
            )
        path = next((p for p, m in module.named_modules() if m is head), None)
        if not path:
            raise PackageError(
                f"the timm model {model_name!r}'s classifier is not one of its submodules",
                "the head is split off by its module path",
                "use another timm model",
            )
        # MobileNetV3-style models widen the pooled features before the classifier:
        # timm's head_hidden_size is then the pre-logits width, num_features is not.
        width = getattr(module, "head_hidden_size", None) or module.num_features
        if head.in_features != width:
            raise PackageError(
                f"the timm model {model_name!r} has {width} features but its classifier "
                f"takes {head.in_features}",
                "forward_head(pre_logits=True) must feed the classifier directly",
                "use another timm model",
            )
        trunk, head = _split(module, path)
        return TimmBackbone(trunk), head

    return split


def _timm_architecture(name: str, options: Mapping[str, ArchOption] | None) -> Architecture:
    """``timm:NAME``: built by ``timm.create_model(NAME, pretrained=False, ...)``, offline."""
    timm = import_timm()
    model_name = name[len(TIMM_PREFIX) :]
    known = timm.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=1)
        hint = f"did you mean 'timm:{close[0]}'? " if close else ""
        raise PackageError(
            f"unknown timm model {model_name[:100]!r}",
            f"timm {timm.__version__} has no model of that name "
            "(models are built by timm, never from code in a package)",
            f"{hint}see timm.list_models(), or upgrade timm to the version that exported it",
        )
    opts = timm_options(dict(options or {}))

    def build(num_classes: int, in_channels: int) -> nn.Module:
        try:
            module: nn.Module = timm.create_model(
                model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **opts
            )
        except Exception as exc:  # timm raises many types for bad option combinations
            raise PackageError(
                f"timm cannot build {model_name!r} with options {opts}",
                exception_summary(exc),
                "drop or change the options (they must be keywords this model accepts)",
            ) from None
        return module

    first = timm.models.get_pretrained_cfg_value(model_name, "first_conv")
    return Architecture(
        name,
        build,
        head_path="",
        feature_dim=0,
        first_conv=f"{first if isinstance(first, str) else ''}.weight",
        channels=(1, 3),
        min_size=8,
        description=f"timm {model_name}",
        split=_timm_split(model_name),
        options=opts or None,
        timm_version=str(timm.__version__),
    )


Resolver = Callable[[str, Mapping[str, ArchOption] | None], Architecture]
"""``resolve(name, options)`` -> the Architecture of a prefixed name (``timm:NAME``)."""

_RESOLVERS: dict[str, Resolver] = {TIMM_PREFIX: _timm_architecture}


def _resolver(name: str) -> Resolver | None:
    prefix, colon, _ = name.partition(":")
    return _RESOLVERS.get(prefix + colon) if colon else None


def resolve_architecture(
    spec: ArchitectureSpec | str, options: Mapping[str, ArchOption] | None = None
) -> Architecture:
    """The Architecture a manifest names: a registered one, or one a prefix resolver builds.

    ``options`` (or ``spec.options``) only apply to prefixed names (``timm:NAME``).

    Raises:
        PackageError: unknown name (with a close match), options outside the
            allowlist, or options given for a registered architecture.

    Examples:
        >>> resolve_architecture("timm:resnet26d").timm_version is not None
        True
    """
    name = spec if isinstance(spec, str) else spec.name
    opts = options if isinstance(spec, str) else spec.options
    resolve = _resolver(name)
    if resolve is not None:
        return resolve(name, opts)
    if opts:
        raise PackageError(
            f"architecture options were given for {name[:64]!r}",
            "only timm:NAME architectures take options",
            "drop the options, or name a timm model",
        )
    return get_architecture(name)
