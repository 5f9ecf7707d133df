"""Models as the commands and the reference scripts load them."""

from .source import ExplainableModel, ModelSource, ModelSourceError, WeightsError

__all__ = ["ExplainableModel", "ModelSource", "ModelSourceError", "WeightsError"]
