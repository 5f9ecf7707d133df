"""torchvision models and their weights (local files, or torchvision's, downloaded as torchvision does),
timm's models when timm is installed, and the reference's `load_architecture`."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import urllib.request
from importlib import resources
from http.client import HTTPException
from typing import Any, Callable, Iterator, Optional, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision
from torchvision.models import WeightsEnum

from ..core.breakpoints import map_layers

Weights = Union[None, str, os.PathLike, WeightsEnum]

# What the reference's `pretrained=True` loads: torchvision's legacy interface maps it to IMAGENET1K_V1
# (for resnet50 not DEFAULT, which is IMAGENET1K_V2).
RELEASE_WEIGHTS = "IMAGENET1K_V1"


class UnknownArchitecture(ValueError):
    """An architecture name that neither torchvision nor timm (when installed) knows."""


# torch.hub's names for checked files: NAME-<first hex digits of the file's sha256>.EXT
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def _cached_path(weights: WeightsEnum) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def file_sha256(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_cached(weights: WeightsEnum) -> None:
    """Refuse a cached weights file whose content is not what its name promises: torch.hub checks the
    hash only when it downloads, and would load any file found under the expected name."""
    path = _cached_path(weights)
    match = HASH_IN_NAME.search(os.path.basename(path))
    if match is not None and os.path.isfile(path):
        _check_content(path, match.group(1), str(weights), weights.url)


def _check_content(path: str, promised: str, what: str, source: str) -> None:
    """Raise when the sha256 of the file at `path` does not start with `promised` (its name's hash)."""
    digest = file_sha256(path)
    if not digest.startswith(promised):
        raise ValueError(
            f"the cached weights file {path} is not the file of {what}: its sha256 starts "
            f"{digest[:len(promised)]}, its name says {promised} (a truncated, damaged or different file); delete "
            f"it so that it is downloaded again, or put the file from {source} there"
        )


def _weights_enum(arch: str, name: str) -> Optional[WeightsEnum]:
    """torchvision weights by name: "IMAGENET1K_V1", "DEFAULT" or "ResNet50_Weights.IMAGENET1K_V1"."""
    try:
        return torchvision.models.get_model_weights(arch)[name.split(".")[-1]]
    except KeyError:
        return None


def weights_source(arch: str, weights: Optional[str]) -> Optional[str]:
    """Where named weights come from today: torchvision's file URL (its name holds the hash) or timm's
    resolved pretrained tag and hub id.  "DEFAULT" names whatever the installed library ships, which
    can change between versions; None for random weights, files and names that resolve to nothing."""
    if weights is None or weights == "random" or os.path.isfile(weights):
        return None
    name = timm_name(arch)
    if name is not None:
        config = _timm_skeleton(_timm_tagged(name, weights)).pretrained_cfg or {}
        return f"timm:{config.get('architecture', name)}.{config.get('tag')} ({config.get('hf_hub_id') or config.get('url')})"
    enum = _weights_enum(arch, weights) if arch in torchvision.models.list_models(module=torchvision.models) else None
    return None if enum is None else enum.url


def load_state_dict(arch: str, weights: Weights) -> Optional[dict[str, torch.Tensor]]:
    """The state dict named by `weights`: None (random weights), a local file, or torchvision weights
    (an enum or its name such as "IMAGENET1K_V1"), downloaded into torch.hub's cache with a progress
    bar when they are not there yet, as torchvision's builders do."""
    if weights is None:
        return None
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{os.fspath(weights)!r} does not hold a state dict (a dict of tensors)")
        return state
    enum = weights if isinstance(weights, WeightsEnum) else _weights_enum(arch, os.fspath(weights))
    if enum is None:
        raise FileNotFoundError(
            f"weights {os.fspath(weights)!r} are neither a file nor torchvision weights of {arch!r}; pass a "
            "local state-dict file (torch.save(model.state_dict(), PATH)) or a torchvision weights name"
        )
    _check_cached(enum)
    try:
        return enum.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except (OSError, HTTPException) as error:  # URLError, refused or reset connections, timeouts
        raise FileNotFoundError(
            f"cannot download torchvision weights {enum} from {enum.url} (offline?): {error}; copy the file to "
            f"{_cached_path(enum)} or pass a local state-dict file (--weights FILE)"
        ) from None


def _timm() -> Optional[Any]:
    try:
        import timm
    except ImportError:
        return None
    return timm


def timm_name(arch: str) -> Optional[str]:
    """`arch` when it names a timm model that torchvision does not have ("vit_tiny_patch16_224",
    "resnet50.a1_in1k" with a pretrained tag) and timm is installed; None otherwise (torchvision's
    names stay torchvision's)."""
    if arch in torchvision.models.list_models(module=torchvision.models):
        return None  # before importing timm, which takes seconds
    timm = _timm()
    return arch if timm is not None and timm.is_model(arch) else None


def _build_timm(name: str, weights: Weights, **kwargs: Any) -> nn.Module:
    """A timm model: random weights, a local state dict, or timm's pretrained weights (its default
    tag with "DEFAULT" or "pretrained", or a tag such as "a1_in1k"), loaded as timm loads them."""
    timm = _timm()
    if isinstance(weights, WeightsEnum):
        raise ValueError(
            f"{weights} are torchvision weights, but {name!r} is a timm model: pass a timm pretrained tag "
            "(\"DEFAULT\" or one such as \"a1_in1k\"), a state-dict file, or None for random weights"
        )
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.load_state_dict(load_state_dict(name, weights))
        return model.eval()
    full = _timm_tagged(name, weights)
    _check_timm_cache(full)
    try:
        with _hub_offline():  # weights in the cache load without a connection, and without its retries
            return timm.create_model(full, pretrained=True, **kwargs).eval()
    except Exception:
        pass
    host = _weights_host(full)
    if host is not None and not _through_proxy(host[0]) and not _reachable(host):
        raise FileNotFoundError(
            f"cannot download timm's pretrained weights of {full!r} from {host[0]} (offline?), and they are not in "
            "the Hugging Face or torch.hub cache: connect once to download them, or pass a local state-dict file "
            "(--weights FILE)"
        )
    try:
        return timm.create_model(full, pretrained=True, **kwargs).eval()
    except Exception as error:
        raise FileNotFoundError(f"timm could not load the pretrained weights of {full!r}: {error}") from error


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def _check_timm_cache(name: str) -> None:
    """Refuse cached timm weights whose content is not what their name promises, as torchvision's: a
    file in torch.hub's cache named with a hash prefix, or a Hugging Face cache blob named by its
    sha256 (huggingface_hub checks it only when it downloads)."""
    try:
        config = _timm().models.get_pretrained_cfg(name)
    except Exception:
        return
    url = getattr(config, "url", None)
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        match = HASH_IN_NAME.search(os.path.basename(path))
        if match is not None and os.path.isfile(path):
            _check_content(path, match.group(1), f"timm's {name!r}", url)
    repository = getattr(config, "hf_hub_id", None)
    if not repository:
        return
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_WEIGHT_FILES:
        cached = try_to_load_from_cache(repository, filename)
        if isinstance(cached, str) and SHA256_NAME.fullmatch(os.path.basename(os.path.realpath(cached))):
            _check_content(os.path.realpath(cached), os.path.basename(os.path.realpath(cached)),
                           f"timm's {name!r}", f"the Hugging Face repository {repository}")  # fmt: skip


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode while the block runs: files come from its cache or not at all."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _weights_host(name: str) -> Optional[tuple[str, int]]:
    """(host, port) that timm downloads the pretrained weights of `name` from; None if it cannot be told."""
    try:
        config = _timm().models.get_pretrained_cfg(name)
    except Exception:
        return None
    if config is None:
        return None
    if getattr(config, "hf_hub_id", None):
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    elif getattr(config, "url", None):
        url = urlparse(config.url)
    else:
        return None
    if url.hostname is None:
        return None
    return url.hostname, url.port or (80 if url.scheme == "http" else 443)


def _through_proxy(host: str) -> bool:
    """Whether downloads from `host` go through a proxy (HTTPS_PROXY, ...): a direct connection then
    says nothing about them."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get("https") or proxies.get("http")) and not urllib.request.proxy_bypass(host)


def _reachable(host: tuple[str, int], seconds: float = 5.0) -> bool:
    """Whether a connection to `host` opens within `seconds`: one try, where a download would retry
    for most of a minute before it fails."""
    try:
        socket.create_connection(host, timeout=seconds).close()
    except OSError:
        return False
    return True


def _timm_tagged(name: str, weights: Weights) -> str:
    """timm's name for `name` with the pretrained tag that `weights` names ("a1_in1k"); "DEFAULT",
    "pretrained", random weights (None), a file, or a name that has its tag already keep timm's default."""
    tag = None if weights is None or isinstance(weights, WeightsEnum) else os.fspath(weights)
    if tag is None or tag in ("DEFAULT", "pretrained") or "." in name or os.path.isfile(tag):
        return name
    return f"{name}.{tag}"


def _timm_skeleton(name: str) -> nn.Module:
    """A timm model without memory behind its weights, to read its configuration."""
    with torch.device("meta"):
        return _timm().create_model(name, pretrained=False)


def timm_preprocessing(arch: str, weights: Weights = None) -> Optional[dict[str, Any]]:
    """timm's pretrained config for preparing images for `arch` with `weights` (a pretrained tag
    changes it): input_size, crop_pct, crop_mode, interpolation, mean and std; None for torchvision's
    models, which take the reference's ImageNet preprocessing."""
    name = timm_name(arch)
    if name is None:
        return None
    config = _timm().data.resolve_data_config({}, model=_timm_skeleton(_timm_tagged(name, weights)))
    return {key: config.get(key) for key in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")}


def timm_num_classes(arch: str) -> Optional[int]:
    """How many classes timm's `arch` outputs (1000 for its ImageNet-1k models); None for torchvision's."""
    name = timm_name(arch)
    return None if name is None else int(_timm_skeleton(name).num_classes)


def timm_default_layer(arch: str) -> Optional[str]:
    """The breakpoint for a timm model: the last block's first norm for ViTs (the last block's output
    patch tokens never reach a class-token head); for CNNs the last module that outputs the last
    stage's grid, so the map is the one the head pools.  The last stage itself can be followed by a
    1 x 1 convolution, a BatchNorm and ReLU6 (EfficientNet's conv_head and bn2) that switch every
    unit off at L2-CAF's start, which gives flat maps.  None for torchvision's models."""
    name = timm_name(arch)
    if name is None:
        return None
    model = _timm_skeleton(name)
    blocks = getattr(model, "blocks", None)
    if getattr(model, "num_prefix_tokens", 0) and isinstance(blocks, nn.Sequential) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    stage = info[-1]["module"]
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    try:
        found = dict(map_layers(model, torch.zeros(1, *size, device="meta")))
    except (RuntimeError, NotImplementedError, TypeError):  # an operation without a meta kernel
        return stage
    grid = found[stage][-1][1:] if stage in found else None
    if grid is None or grid[0] != grid[1]:  # not a channels-first map of a square input (Swin's is channels-last)
        return stage
    modules = dict(model.named_modules())
    last = [layer for layer, shapes in found.items() if shapes[-1][1:] == grid and not isinstance(modules[layer], nn.Identity)]
    return last[-1] if last else stage


def build_model(arch: str, weights: Weights = None, **kwargs: Any) -> nn.Module:
    """A torchvision classification model in eval mode, with random weights (None) or `weights`; a timm
    model for "timm/NAME" or a name only timm knows, when timm is installed."""
    name = timm_name(arch)
    if name is not None:
        return _build_timm(name, weights, **kwargs)
    try:
        builder: Callable[..., nn.Module] = torchvision.models.get_model_builder(arch)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
        extra = "" if _timm() is not None else " (timm's models too after pip install 'caffast[timm]')"
        raise UnknownArchitecture(f"unknown architecture {arch!r}; torchvision classification models: {known}{extra}") from None
    state = load_state_dict(arch, weights)
    if arch in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", state is None)
        kwargs.setdefault("transform_input", state is not None)
    model = builder(weights=None, **kwargs)
    if state is not None:
        if not model_has_aux(model):
            state = {key: value for key, value in state.items() if not key.startswith(("aux1.", "aux2.", "AuxLogits."))}
        model.load_state_dict(state)
    return model.eval()


def model_has_aux(model: nn.Module) -> bool:
    return any(getattr(model, name, None) is not None for name in ("aux1", "aux2", "AuxLogits"))


_REFERENCE_BREAKPOINTS = {"resnet50": "layer4", "googlenet": "inception5b", "densenet169": "features"}


def reference_head(arch: str, model: nn.Module) -> nn.Sequential:
    if arch == "densenet169":
        return nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.classifier)
    return nn.Sequential(model.avgpool, nn.Flatten(), model.fc)


def load_architecture(
    arch_name: str, weights: Weights = RELEASE_WEIGHTS
) -> tuple[nn.Module, list[torch.Tensor], nn.Sequential]:
    """The reference triple: (model, feature_maps, post_conv_subnet), by default with the weights the
    reference loads (IMAGENET1K_V1, downloaded when missing); `weights=None` gives random ones.

    A forward hook on the last convolutional block appends its detached output to `feature_maps`;
    `post_conv_subnet` is the head after it.  The model is in eval mode with frozen parameters, on the
    GPU when there is one, as in the reference.
    """
    if arch_name not in _REFERENCE_BREAKPOINTS:
        raise ValueError(
            f"load_architecture knows {', '.join(_REFERENCE_BREAKPOINTS)}, not {arch_name!r}; for another "
            "torchvision model use caffast.explain(model, images, layer) directly"
        )
    model = build_model(arch_name, weights)
    if torch.cuda.is_available():
        model = model.cuda()
    feature_maps: list[torch.Tensor] = []
    breakpoint = model.get_submodule(_REFERENCE_BREAKPOINTS[arch_name])
    breakpoint.register_forward_hook(lambda _module, _inputs, output: feature_maps.append(output.detach()))
    for param in model.parameters():
        param.requires_grad = False
    head = reference_head(arch_name, model).eval()
    return model, feature_maps, head


@functools.lru_cache(maxsize=1)
def release_labels() -> tuple[str, ...]:
    """The release's ImageNet label table (its utils/imagenet_lbls.py), class 0 to 999, as it logs them;
    its file names drop the commas: `label.replace(",", "")`."""
    text = (resources.files("caffast.models") / "release_labels.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def feature_map_layers(model: nn.Module, size: int = 224) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The candidate breakpoints (caffast.core.breakpoints.map_layers) on one (1, 3, size, size) input."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return map_layers(model, torch.zeros(1, 3, size, size, device=device, dtype=dtype))