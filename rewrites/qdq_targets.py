"""Where a runtime turns QuantizeLinear/DequantizeLinear groups into integer kernels, as data.

The QDQ planner (rewrites/qdq.py) reads one `Target`; supporting another runtime means writing
another table, not another code path. Facts for onnxruntime's CPU EP: ../shared/REFERENCE.md,
"What ORT's CPU EP turns into integer kernels".
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    # DQ(activation) + DQ(constant weight) -> op -> Q: op type -> (weight input, bias input or
    # None). `needs_output_q`: without a Q on the output the op stays float (Conv); the others
    # still run integer maths with a float output (MatMulIntegerToFloat, QGemm).
    weighted: dict[str, tuple[int, int | None]]
    needs_output_q: frozenset[str]
    # DQ(every float input is a quantized activation) -> op -> Q(output): an integer kernel.
    integer: frozenset[str]
    # Run directly on the quantized type when input and output share scale and zero point.
    # Input 0 carries the data (the others are shapes, indices, scales...).
    data_movement: frozenset[str]
    # Dropped by the runtime when the following Q's range already implies them: the group's
    # output is taken after them, so their output is the one calibrated.
    absorbed: frozenset[str]
    # Below this many elements (static shapes only), per-op overhead makes these integer
    # kernels lose to float: Add/Mul that would need a constant or a float operand quantized
    # for them (and HardSwish written as such). 0: always integer.
    small_tensor: int = 0
    # Depthwise Conv (group == input channels > 1) as an integer kernel; False keeps it float.
    integer_depthwise: bool = True
    # A Conv reading at most this many channels (an image stem) stays float when its output is
    # not small: there the runtime's float kernel beats the integer one. 0: none.
    float_stem_channels: int = 0
    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"

    def is_small(self, v, shapes: dict | None = None) -> bool:
        """Fewer elements than small_tensor: an ir.Value's shape in `shapes` (bound to the
        calibration inputs), else its own when static but for a symbolic batch dimension
        (counted as 1); other symbolic sizes may be large."""
        size = self._size(v, shapes)
        return size is not None and size < self.small_tensor

    def is_known_large(self, v, shapes: dict | None = None) -> bool:
        """At least small_tensor elements, by a size known as is_small knows it."""
        size = self._size(v, shapes)
        return size is not None and size >= self.small_tensor

    @staticmethod
    def _size(v, shapes: dict | None) -> int | None:
        shape = (shapes or {}).get(v.name, v.shape)
        if not shape or not all(isinstance(d, int) for d in shape[1:]):
            return None
        batch = shape[0] if isinstance(shape[0], int) else 1
        return batch * math.prod(shape[1:])


ORT_CPU = Target(
    name="onnxruntime-cpu",
    weighted={"Conv": (1, 2), "MatMul": (1, None), "Gemm": (1, 2)},
    needs_output_q=frozenset({"Conv"}),
    # Softmax has a QLinearSoftmax, but softmax inputs (attention logits, masks of -10000) lose
    # too much at 8 bits (REFERENCE.md, static quantizer traps): it stays float. Sub, Div, Pow,
    # norms, Tanh, Erf... have no integer kernel: DQ -> op -> Q around them is pure overhead.
    integer=frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "LeakyRelu",
                       "Sigmoid"}),
    data_movement=frozenset({"MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                             "Split", "Slice", "Resize", "Gather", "Expand", "Tile"}),
    absorbed=frozenset({"Relu", "Clip"}),
    # Measured on onnxruntime 1.32, one thread, AVX-512 VNNI. Between integer ops a float op
    # costs a DequantizeLinear, a QuantizeLinear and layout Transposes, so elementwise ops pay
    # as integer kernels on big maps; on the direction classifier's (18k-38k values) they do
    # not (1.4x float when quantized, 0.94x when not).
    small_tensor=40000,
    # A QDQ depthwise 3x3 Conv takes 1.1-2.9x the float time on small maps (5x5: up to 4.2x);
    # on big ones it pays (PP-OCR det and rec at 0.40x float instead of about 0.5x), but
    # quantizing it (its weights round within 1%: the loss is in the quantized path around it)
    # costs the recognizer 0.6-2.2 points of character accuracy (float: 0.0).
    integer_depthwise=False,
    # QLinearConv on 3 input channels takes 2.1x the float Conv (ORT's NCHWc kernel reads the
    # NCHW image directly): 8.2 vs 3.9 ms on the PP-OCRv4 detector's stem, whose float form
    # also spares quantizing the page (1.2-1.7 ms): det 0.39x -> 0.36x float, rec unchanged.
    float_stem_channels=4,
)
