"""Compression algorithms for the uplink: sparsifiers (Top-k, Gaia) and quantisers.

Importing this package registers the built-in processors; the chain that applies them is
:mod:`apf_ray.uplink`, the bytes they produce are framed by :mod:`apf_ray.wire`.
"""

from apf_ray.compression import gaia, quantize, topk
from apf_ray.compression.base import (
    UPLINK_STAGES,
    Quantizer,
    Sparsifier,
    UplinkStage,
    quantizer,
    register_stage,
    stage_class,
    stage_spec,
)

__all__ = [
    "UPLINK_STAGES",
    "Quantizer",
    "Sparsifier",
    "UplinkStage",
    "gaia",
    "quantize",
    "quantizer",
    "register_stage",
    "stage_class",
    "stage_spec",
    "topk",
]
