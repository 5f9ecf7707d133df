"""caffast: L2-CAF attention maps, exact to the reference, batched and fast."""

from .engine.explain import Explanation, explain
from .core.constraints import L2_CAF, normalize_filter
from .core.finite import NonFiniteError
from .core.losses import CLASS_LOSSES, ClassLoss
from .engine.flat import FlatMapWarning
from .core.optimizers import polynomial_lr_decay
from .core.settings import RELEASE_SETTINGS, TF_RELEASE_SETTINGS, Settings
from .viz import apply_heatmap
from .models.zoo import load_architecture

__all__ = [
    "CLASS_LOSSES",
    "ClassLoss",
    "Explanation",
    "FlatMapWarning",
    "L2_CAF",
    "NonFiniteError",
    "RELEASE_SETTINGS",
    "Settings",
    "TF_RELEASE_SETTINGS",
    "apply_heatmap",
    "explain",
    "load_architecture",
    "normalize_filter",
    "polynomial_lr_decay",
]
__version__ = "0.1.0"
