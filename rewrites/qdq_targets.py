"""Where a runtime turns QuantizeLinear/DequantizeLinear groups into integer kernels, as data.

The QDQ planner (rewrites/qdq.py) reads one `Target`; supporting another runtime means writing
another table, not another code path. Facts for onnxruntime's CPU EP: ../shared/REFERENCE.md,
"What ORT's CPU EP turns into integer kernels".
"""

from __future__ import annotations

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
    # False when the runtime's integer depthwise Conv (group == input channels > 1) is slower
    # than its float one: such a Conv stays float.
    fast_integer_depthwise: bool = True
    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"


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
    # Measured on onnxruntime 1.32, one thread, AVX-512 VNNI: a QDQ depthwise 3x3 Conv takes
    # 1.1-2.9x the float one's time (5x5: up to 4.2x); pointwise and dense convs take 0.5-0.6x.
    fast_integer_depthwise=False,
)
