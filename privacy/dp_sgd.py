"""DP-SGD's per-record clipping in one fused pass, for models built of ``nn.Linear``/``nn.Conv2d``.

DP-SGD (Abadi et al. 2016) clips every record's gradient to L2 norm ≤ C before summing. Opacus
computes per-record gradients with hooks (or a second backward pass in its ghost mode), which on
small models costs several times a normal step, mostly in fixed per-step overhead. For the layers
fedgov's models use the same clipped sum comes from one backward pass:

- run the forward pass once, keeping each layer's input ``a`` and output ``z``;
- one ``autograd.grad`` of the summed loss with respect to the outputs gives ``g = ∂ℓ_i/∂z_i``
  for every record (a record's loss depends only on its own row) — no weight gradients;
- ``nn.Linear``: record i's weight gradient is the outer product g_i a_iᵀ, so its squared norm is
  ‖g_i‖²·‖a_i‖² (plus ‖g_i‖² for the bias) — no per-record gradient is materialised;
- ``nn.Conv2d``: record i's weight gradient Σ_l g_il a_ilᵀ (over output positions l) comes from one
  grouped convolution backward with the batch as the groups (or, for a one-channel first layer,
  one batched matmul with the input's shifted views);
- with c_i = min(1, C/‖∇ℓ_i‖), the clipped sum is Σ_i c_i g_i a_iᵀ: one matmul per layer.

The result is exactly Opacus' flat clipping (``tests/test_privacy_maths.py`` checks it against
Opacus' per-sample gradients and a naive per-record loop); noise, averaging and accounting are
unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Added to a norm before dividing, as Opacus does (``max_grad_norm / (norm + 1e-6)``).
NORM_EPSILON = 1e-6


class UnsupportedModel(ValueError):
    """The model has a parameterised layer the fused pass does not handle."""


class FusedClipper:
    """Clipped per-record gradient sums for a model of Linear/Conv2d layers (see module doc)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[nn.Module] = []
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if isinstance(module, nn.Linear):
                self.layers.append(module)
            elif isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.padding_mode != "zeros":
                    raise UnsupportedModel(f"{module}: only groups=1, zero padding")
                if isinstance(module.padding, str):
                    raise UnsupportedModel(f"{module}: give padding as numbers")
                self.layers.append(module)
            elif own:
                raise UnsupportedModel(f"{type(module).__name__} has parameters")
        covered = {id(p) for layer in self.layers for p in layer.parameters(recurse=False)}
        if any(id(p) not in covered for p in model.parameters()):
            raise UnsupportedModel("a parameter outside Linear/Conv2d layers")
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = [layer.register_forward_hook(self._keep) for layer in self.layers]

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        self._records.append((module, inputs[0].detach(), output))

    def remove(self) -> None:
        """Detach the forward hooks (the model is then an ordinary module again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clipped_gradient_sum(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
    ) -> tuple[float, torch.Tensor]:
        """Set every parameter's ``.grad`` to Σ_i clip_C(∇ℓ_i) over the rows of ``x``.

        ``ℓ_i`` is the cross-entropy of record i. Returns (summed loss, per-record gradient norms
        before clipping). An empty batch gives zero gradients.
        """
        params = list(self.model.parameters())
        if len(y) == 0:
            for p in params:
                p.grad = torch.zeros_like(p)
            return 0.0, torch.zeros(0)
        self._records = []
        loss = F.cross_entropy(self.model(x), y, reduction="sum")
        records, self._records = self._records, []
        outputs = [output for _, _, output in records]
        output_grads = torch.autograd.grad(loss, outputs)
        squared = torch.zeros(len(y), dtype=torch.float32)
        pending = []
        for (layer, inputs, _), grad in zip(records, output_grads, strict=True):
            if isinstance(layer, nn.Linear):
                if inputs.dim() != 2:
                    raise UnsupportedModel("Linear on inputs with more than 2 dimensions")
                grad_sq = grad.pow(2).sum(1)
                squared += grad_sq * inputs.pow(2).sum(1)
                if layer.bias is not None:
                    squared += grad_sq
                pending.append((layer, inputs, grad, None))
            else:
                per_record = conv2d_per_record_weight_grads(layer, inputs, grad)
                squared += per_record.pow(2).sum((1, 2))
                bias_grad = grad.sum((2, 3))
                if layer.bias is not None:
                    squared += bias_grad.pow(2).sum(1)
                pending.append((layer, per_record, bias_grad, "conv"))
        norms = squared.sqrt()
        scale = (max_grad_norm / (norms + NORM_EPSILON)).clamp(max=1.0)
        for layer, first, second, kind in pending:
            if kind is None:  # Linear: first = inputs (B, in), second = output grads (B, out)
                scaled = second * scale[:, None]
                layer.weight.grad = scaled.t() @ first
                if layer.bias is not None:
                    layer.bias.grad = scaled.sum(0)
            else:  # Conv2d: first = per-record weight grads (B, out, in·k·k), second = bias
                layer.weight.grad = torch.einsum("b,bij->ij", scale, first).view_as(layer.weight)
                if layer.bias is not None:
                    layer.bias.grad = scale @ second
        return float(loss.detach()), norms


def conv2d_per_record_weight_grads(
    layer: nn.Conv2d, inputs: torch.Tensor, output_grads: torch.Tensor
) -> torch.Tensor:
    """Every record's weight gradient of a Conv2d (groups=1), shape (B, out, in·kh·kw).

    Record b's gradient is Σ_l g_bl u_blᵀ over output positions l (u_bl the input patch under the
    kernel at l). Two ways, both exact, chosen for speed on CPU with one thread:

    - one input channel, stride 1, no dilation (a first layer on grey images): the kh·kw shifted
      views of the padded input, stacked, and one batched matmul with the output gradients;
    - otherwise one grouped convolution backward with the batch as the groups (input
      (1, B·in, H, W), output gradient (1, B·out, H', W'), groups = B: group b's weight gradient
      is record b's), on NCHW copies of channels-last tensors; 3× faster than unfold + a
      batched matmul here.

    One-channel image rows sliced from a NumPy array come with a channel stride of 1, which
    PyTorch takes for channels-last: the whole network then runs channels-last (max-pooling is
    ≈ 10× faster so on CPU) and the output gradients arrive channels-last too.
    """
    batch, channels_in = inputs.shape[:2]
    channels_out = output_grads.shape[1]
    kh, kw = layer.kernel_size
    if channels_in == 1 and tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1):
        out_h, out_w = output_grads.shape[2:]
        pad_h, pad_w = layer.padding
        padded = F.pad(inputs[:, 0], (pad_w, pad_w, pad_h, pad_h))
        shifted = torch.stack(
            [padded[:, i : i + out_h, j : j + out_w] for i in range(kh) for j in range(kw)], 1
        ).flatten(2)  # (B, kh·kw, H'·W')
        if output_grads.is_contiguous(memory_format=torch.channels_last):
            # (B, H'·W', out) is then a view: no copy of the (large) output gradients
            by_position = output_grads.permute(0, 2, 3, 1).reshape(batch, out_h * out_w, -1)
            return torch.bmm(shifted, by_position).mT
        return torch.bmm(output_grads.reshape(batch, channels_out, -1), shifted.mT)
    weight_shape = inputs.new_empty((batch * channels_out, channels_in, kh, kw))
    _, grads, _ = torch.ops.aten.convolution_backward(
        output_grads.contiguous().view(1, batch * channels_out, *output_grads.shape[2:]),
        inputs.contiguous().view(1, batch * channels_in, *inputs.shape[2:]),
        weight_shape,
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0, 0],
        batch,
        [False, True, False],
    )
    return grads.reshape(batch, channels_out, channels_in * kh * kw)
