"""Transformer layers: channels-last maps and tokens become a grid filter that multiplies the patch
cells where they lie; reshape_transform defines a layout; ambiguous shapes are refused."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.ops.misc import Permute

import caffast
from caffast.cam import L2CAF
from caffast.core.layouts import resolve_layout
from reference_loop import capture


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return torchvision.models.swin_t().eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=64).eval()
    nn.init.normal_(model.heads.head.weight, std=0.05)  # torchvision starts it at zero: every map would be flat
    return model


class ChannelsFirstSwin(nn.Module):
    """swin_t with an explicit channels-first point after `features`: the oracle of the NHWC layout."""

    def __init__(self, swin):
        super().__init__()
        self.swin = swin
        self.to_nchw = Permute([0, 3, 1, 2])
        self.back = Permute([0, 2, 3, 1])

    def forward(self, x):
        s = self.swin
        return s.head(s.flatten(s.avgpool(s.permute(s.norm(self.back(self.to_nchw(s.features(x))))))))


def test_swin_channels_last_map_is_a_7_by_7_grid(swin):
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    exp = caffast.explain(swin, images, "features", mode="specific", targets=[5], max_iter=20)
    assert exp.maps.shape == (1, 1, 7, 7) and exp.features.shape == (1, 768, 7, 7)
    oracle = caffast.explain(ChannelsFirstSwin(swin), images, "to_nchw", mode="specific", targets=[5], max_iter=20)
    torch.testing.assert_close(exp.maps, oracle.maps, atol=1e-5, rtol=1e-4)
    assert exp.tail == "fx"
    with pytest.raises(ValueError, match="layout='tokens' needs an \\(N, L, C\\) output"):
        caffast.explain(swin, images, "features", layout="tokens", max_iter=2)


def test_swin_block_norm_with_a_permuting_reshape_transform(swin):
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    auto = caffast.explain(swin, images, "features.5.1.norm2", mode="specific", targets=[5], max_iter=10)
    permuted = caffast.explain(swin, images, "features.5.1.norm2", mode="specific", targets=[5], max_iter=10,
                               reshape_transform=lambda x: x.permute(0, 3, 1, 2))  # fmt: skip
    torch.testing.assert_close(auto.maps, permuted.maps)
    assert auto.maps.shape == (1, 1, 4, 4)


def vit_transform(height, width):
    """pytorch-grad-cam's ViT reshape_transform, restated: drop the class token, tokens to a grid."""
    return lambda x: x[:, 1:, :].reshape(x.shape[0], height, width, x.shape[2]).transpose(2, 3).transpose(1, 2)


def test_vit_tokens_leave_the_class_token_alone(vit):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    layer = vit.encoder.layers[-2]
    _, tokens = capture(vit, layer, images)
    filters = torch.ones(2, 4, 4, requires_grad=True)

    def filtered(_m, _i, _out):  # the oracle: patch tokens times f / ||f||, the class token as it was
        cells = (filters / filters.norm(dim=(1, 2), keepdim=True)).flatten(1)[:, :, None]
        return torch.cat([tokens[:, :1], tokens[:, 1:] * cells], dim=1)

    handle = layer.register_forward_hook(filtered)
    try:
        logits = vit(images)
    finally:
        handle.remove()
    loss = (logits.sum(dim=1) - 2 * logits[:, 7]).sum()
    (grad,) = torch.autograd.grad(loss, filters)
    assert grad.abs().max() > 1e-6
    name = "encoder.layers.encoder_layer_10"
    for options in ({}, {"layout": "tokens"}, {"reshape_transform": vit_transform(4, 4)}):
        exp = caffast.explain(vit, images, name, mode="specific", targets=[7], max_iter=1, **options)
        torch.testing.assert_close(exp.parameters[:, 0], (filters - 0.5 * grad).detach(), rtol=1e-4, atol=1e-6)
        assert exp.features.shape == (2, 768, 4, 4)


def test_l2caf_with_reshape_transform_on_vit(vit):
    images = torch.randn(2, 3, 64, 64)
    layers = [vit.encoder.layers[-2].ln_1]
    cam = L2CAF(model=vit, target_layers=layers, reshape_transform=vit_transform(4, 4), max_iter=20)
    maps = cam(input_tensor=images, targets=None)
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() == 0.0 and np.allclose(maps.max(axis=(1, 2)), 1.0)


def test_timm_swin_and_vit_layouts():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2).eval()
    images = torch.randn(1, 3, 64, 64)
    stage = caffast.explain(swin, images, "layers.3", mode="specific", targets=[1], max_iter=5)
    assert stage.maps.shape == (1, 1, 2, 2)
    norm2 = caffast.explain(swin, images, "layers.2.blocks.1.norm2", mode="specific", targets=[1], max_iter=5)
    swin_transform = lambda x: x.reshape(x.shape[0], 4, 4, x.shape[2]).permute(0, 3, 1, 2)  # noqa: E731
    restated = caffast.explain(swin, images, "layers.2.blocks.1.norm2", mode="specific", targets=[1], max_iter=5,
                               reshape_transform=swin_transform)  # fmt: skip
    torch.testing.assert_close(norm2.maps, restated.maps)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    tokens = caffast.explain(vit, images, "blocks.10", mode="specific", targets=[1], max_iter=5)
    restated = caffast.explain(vit, images, "blocks.10", mode="specific", targets=[1], max_iter=5,
                               reshape_transform=vit_transform(4, 4))  # fmt: skip
    torch.testing.assert_close(tokens.maps, restated.maps)


class Opaque(nn.Module):
    """A layer whose modules say nothing about where its channels are."""

    def forward(self, x):
        return x * 2


class Cube(nn.Module):
    """64 x 64 images to an (N, 8, 8, 8) map: channels first or last fit the image alike."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.opaque = Opaque()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.opaque(self.conv(x)).mean(dim=(2, 3)))


def test_an_ambiguous_4d_shape_is_refused_and_layout_decides():
    torch.manual_seed(0)
    model = Cube().eval()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 8\).*pass layout='nchw' or layout='nhwc'"):
        caffast.explain(model, images, "opaque", max_iter=2)
    by_layout = caffast.explain(model, images, "opaque", layout="nchw", mode="specific", targets=[1], max_iter=20)
    by_conv = caffast.explain(model, images, "conv", mode="specific", targets=[1], max_iter=20)  # a Conv2d: NCHW
    torch.testing.assert_close(by_layout.maps, by_conv.maps)
    swapped = caffast.explain(model, images, "opaque", layout="nhwc", mode="specific", targets=[1], max_iter=20)
    assert swapped.maps.shape == (2, 1, 8, 8) and not torch.allclose(swapped.maps, by_conv.maps)


def test_a_reshape_transform_that_is_not_a_rearrangement_is_refused(vit):
    images = torch.randn(1, 3, 64, 64)
    resize = lambda x: torch.nn.functional.interpolate(vit_transform(4, 4)(x), size=(8, 8), mode="bilinear")  # noqa: E731
    with pytest.raises(ValueError, match="only select and rearrange"):
        caffast.explain(vit, images, "encoder.layers.encoder_layer_10", reshape_transform=resize, max_iter=2)
    with pytest.raises(ValueError, match="either layout= or reshape_transform="):
        caffast.explain(vit, images, "encoder.layers.encoder_layer_10", layout="tokens",
                        reshape_transform=vit_transform(4, 4), max_iter=2)  # fmt: skip
    with pytest.raises(ValueError, match="unknown layout .chw.; choose one of .nchw., .nhwc., .tokens."):
        caffast.explain(vit, images, "encoder.layers.encoder_layer_10", layout="chw", max_iter=2)


class Channels(nn.Module):
    """A stride-4 convolution to 16 channels, then `norm`: 64 x 64 images give an (N, 16, 16, 16) map,
    so only the norm can tell where the channels are."""

    def __init__(self, norm, channels_last=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.block = nn.Sequential(Permute([0, 2, 3, 1]) if channels_last else nn.Identity(), norm)
        self.fc = nn.Linear(16, 5)
        self.grid_dims = (1, 2) if channels_last else (2, 3)

    def forward(self, x):
        return self.fc(self.block(self.conv(x)).mean(dim=self.grid_dims))


def test_a_channels_first_layer_norm_subclass_is_read_channels_first():
    """torchvision's and timm's LayerNorm2d subclass nn.LayerNorm but normalize an (N, C, H, W) map."""
    timm = pytest.importorskip("timm")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for norm in (torchvision.models.convnext.LayerNorm2d(16), timm.layers.LayerNorm2d(16)):
        torch.manual_seed(0)
        model = Channels(norm).eval()
        settings = {"mode": "specific", "targets": [2], "solver": "fast", "max_iter": 10}
        auto = caffast.explain(model, images, "block", **settings)
        nchw = caffast.explain(model, images, "block", layout="nchw", **settings)
        nhwc = caffast.explain(model, images, "block", layout="nhwc", **settings)
        torch.testing.assert_close(auto.maps, nchw.maps)
        assert (auto.maps - nhwc.maps).abs().max() > 0.1  # the two readings give different maps here


def test_a_channels_last_layer_norm_with_its_own_forward_stays_channels_last():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = Channels(timm.layers.LayerNorm(16), channels_last=True).eval()
    images = torch.randn(1, 3, 64, 64)
    settings = {"mode": "specific", "targets": [2], "solver": "fast", "max_iter": 10}
    auto = caffast.explain(model, images, "block", **settings)
    nhwc = caffast.explain(model, images, "block", layout="nhwc", **settings)
    torch.testing.assert_close(auto.maps, nhwc.maps)


def test_convnext_stem_with_as_many_channels_as_cells_is_channels_first():
    """timm's convnext_atto stem outputs (N, 40, 40, 40) for 160 x 160 images."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    image = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        features = model.stem(image)
    assert features.shape == (1, 40, 40, 40)
    assert resolve_layout("stem", features, (160, 160), model, model.stem).name == "nchw"


class ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class PatchTokens(nn.Module):
    """Patches of 8 x 8 pixels as (N, L, C) tokens without prefix tokens; `patches` holds the same
    values as an (N, C, H, W) map, the channels-first oracle of `tokens`."""

    num_prefix_tokens = 0

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 8, stride=8)
        self.tokens = ToTokens()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.tokens(self.patches(x))).mean(dim=1))


@pytest.mark.parametrize("constraint", ["gauss", "softmax"])
def test_every_constraint_on_tokens(constraint):
    torch.manual_seed(0)
    model = PatchTokens().eval()
    images = torch.randn(2, 3, 32, 32)
    settings = {"mode": "specific", "targets": [1], "constraint": constraint, "max_iter": 10, "fused": False}
    tokens = caffast.explain(model, images, "tokens", **settings)
    grid = caffast.explain(model, images, "patches", **settings)
    torch.testing.assert_close(tokens.maps, grid.maps)
