"""LieRA layers and model helpers."""
from .layers import (LAYER_TYPES, LieConv1d, LieConv2d, LieConv3d, LieLayer, LieLinear,
                     lie_type_for)
from .injection import inject
from .merging import merge, merge_and_unload, unload, unmerge
from .model import ParameterCounts, adapted_weights, batch_builds, lie_layers, trainable_parameters

__all__ = ["LieLayer", "LieLinear", "LieConv1d", "LieConv2d", "LieConv3d", "LAYER_TYPES",
           "inject", "merge", "unmerge", "lie_layers", "trainable_parameters",
           "adapted_weights", "batch_builds", "unload", "merge_and_unload", "ParameterCounts",
           "lie_type_for"]
