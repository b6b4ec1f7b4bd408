"""ONNX export of fedgov's models, and an ONNX Runtime predictor for serving.

torch 2.13's default exporter (``dynamo=True``) needs ``onnxscript``; the TorchScript exporter
(``dynamo=False``) needs nothing beyond torch and handles every fedgov model (Linear, ReLU, Conv2d,
MaxPool2d, Flatten), so it is the one used. The batch dimension is dynamic.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """The model as ONNX: input ``input`` of shape (batch, *input_shape), output ``logits``."""
    model = model.eval()
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


class OnnxPredictor:
    """Logits from ONNX bytes with ONNX Runtime (CPU)."""

    def __init__(self, onnx_bytes: bytes, threads: int = 1) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]


class TorchPredictor:
    """Logits from the torch model (the same weights the ONNX file was exported from)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def onnx_max_abs_diff(onnx_bytes: bytes, model: nn.Module, x: np.ndarray) -> float:
    """The largest absolute difference between ONNX Runtime's and torch's logits on ``x``."""
    onnx_logits = OnnxPredictor(onnx_bytes)(x)
    torch_logits = TorchPredictor(model)(x)
    return float(np.max(np.abs(onnx_logits - torch_logits))) if x.size else 0.0
