"""LieRA layers and model helpers."""
from .layers import LAYER_TYPES, LieConv1d, LieConv2d, LieConv3d, LieLayer, LieLinear
from .model import inject, lie_layers, merge, trainable_parameters, unmerge

__all__ = ["LieLayer", "LieLinear", "LieConv1d", "LieConv2d", "LieConv3d", "LAYER_TYPES",
           "inject", "merge", "unmerge", "lie_layers", "trainable_parameters"]
