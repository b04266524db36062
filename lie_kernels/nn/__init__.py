"""LieRA layers and model helpers."""
from .layers import LAYER_TYPES, LieConv1d, LieConv2d, LieConv3d, LieLayer, LieLinear
from .model import (adapted_weights, batch_builds, inject, lie_layers, merge,
                    trainable_parameters, unmerge)

__all__ = ["LieLayer", "LieLinear", "LieConv1d", "LieConv2d", "LieConv3d", "LAYER_TYPES",
           "inject", "merge", "unmerge", "lie_layers", "trainable_parameters",
           "adapted_weights", "batch_builds"]
