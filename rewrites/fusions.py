"""Portable fusions (plain ONNX ops only): the `fuse` pass.

BatchNormalization, per-channel Mul and bias Add fold into the Conv/ConvTranspose/Gemm/MatMul
before them (`fuse_affine`), a per-channel Mul, and an Add before an unpadded Conv, into the
Conv after them (`fuse_conv_input`), MatMul + Add becomes Gemm, and written-out LayerNormalization
(opset 17), Gelu (opset 20) and HardSwish (opset 14; HardSigmoid * x below) become single ops
(`fuse_norms`, `fuse_gelu`, `fuse_hardswish`).
"""

from __future__ import annotations

from .base import RulePass
from .fuse_affine import FuseBatchNorm, FuseConvAdd, FuseConvMul, FuseMatMulAdd
from .fuse_conv_input import FuseConvInputAffine
from .fuse_gelu import FuseGelu
from .fuse_hardswish import FuseHardSwish
from .fuse_norms import FuseLayerNorm


def fuse() -> RulePass:
    return RulePass([FuseBatchNorm(), FuseConvAdd(), FuseConvMul(), FuseConvInputAffine(), FuseMatMulAdd(),
                     FuseLayerNorm(), FuseGelu(), FuseHardSwish()], name="fuse")


__all__ = ["fuse", "FuseBatchNorm", "FuseConvAdd", "FuseConvMul", "FuseConvInputAffine", "FuseMatMulAdd", "FuseLayerNorm",
           "FuseGelu", "FuseHardSwish"]
