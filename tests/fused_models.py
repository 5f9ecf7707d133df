"""Models with fused heads that several suites share: the torchvision families and a small net with a
ReLU before its head."""

import torch
import torchvision

# (architecture, last layer, input size); every one ends in [ReLU] -> global average pool -> Linear
FUSED_FAMILIES = [
    ("resnet18", "layer4", 64),
    ("googlenet", "inception5b", 64),
    ("inception_v3", "Mixed_7c", 128),
    ("densenet121", "features", 64),
    ("mobilenet_v2", "features", 64),
    ("efficientnet_b0", "features", 64),
    ("regnet_x_400mf", "trunk_output", 64),
    ("shufflenet_v2_x0_5", "conv5", 64),
    ("mnasnet0_5", "layers", 64),
]


class ReluHead(torch.nn.Module):
    """A small net whose breakpoint features take both signs and whose head starts with a ReLU."""

    def __init__(self, classes=12):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2)
        )
        self.classifier = torch.nn.Linear(32, classes)

    def forward(self, x):
        x = torch.nn.functional.relu(self.features(x))
        return self.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1))


def build(arch, classes=12):
    torch.manual_seed(5)
    if arch == "relu_head":
        return ReluHead(classes).double().eval()
    kwargs = {"num_classes": classes}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return getattr(torchvision.models, arch)(**kwargs).double().eval()
