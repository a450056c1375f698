"""The router: a tiny fp32 classifier over a token's layer input. Logit 0 = execute, 1 = skip."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """``Linear(d, 2)`` (default) or ``d -> d/4 -> ReLU -> 2``, always computed in fp32.

    The parameter names (``weight_predictor.weight`` / ``.bias``) match the authors' released
    checkpoints, so their router files load without renaming.

    ``input_scale`` (a buffer, 1 by default) multiplies the input. Residual-stream norms grow by
    orders of magnitude with depth (SmolLM2: median |h| 3 at layer 0, 600 at layer 29), so with
    one learning rate the margins of deep routers saturate the Gumbel-softmax and their
    gradients vanish. :func:`skipgpt.calibrate_input_scale` sets it to 1/RMS(h_l), so every
    router sees unit-RMS inputs; the scale folds into the margin weights, so the fused
    decision costs nothing extra.
    """

    def __init__(
        self,
        hidden_size: int,
        router_type: str = "linear",
        init_execute_bias: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.router_type = router_type
        kw = dict(device=device, dtype=torch.float32)
        if router_type == "linear":
            self.weight_predictor = nn.Linear(hidden_size, 2, **kw)
            last = self.weight_predictor
        elif router_type == "mlp":
            self.weight_predictor = nn.Sequential(
                nn.Linear(hidden_size, hidden_size // 4, **kw),
                nn.ReLU(),
                nn.Linear(hidden_size // 4, 2, **kw),
            )
            last = self.weight_predictor[2]
        else:
            raise ValueError(f"router_type must be 'linear' or 'mlp', got {router_type!r}")
        self.register_buffer("input_scale", torch.ones((), device=device, dtype=torch.float32))
        self.reset_parameters(init_execute_bias, last)

    @torch.no_grad()
    def reset_parameters(self, init_execute_bias: float, last: nn.Linear) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                nn.init.zeros_(m.bias)
        # Split the execute bias symmetrically so that margin = b0 - b1 = init_execute_bias.
        last.bias.copy_(torch.tensor([init_execute_bias / 2, -init_execute_bias / 2]))

    @property
    def output_layer(self) -> nn.Linear:
        """The ``Linear`` that produces the two logits (its bias sets the execute margin)."""
        return self.weight_predictor if self.router_type == "linear" else self.weight_predictor[2]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., 2]`` in fp32, whatever the model dtype (or a stray ``.to(bf16)``)."""
        x = h.to(torch.float32) * self.input_scale.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.router_type == "linear":
                return F.linear(x, self.weight_predictor.weight.float(), self.weight_predictor.bias.float())
            l1, _, l2 = self.weight_predictor
            x = F.relu(F.linear(x, l1.weight.float(), l1.bias.float()))
            return F.linear(x, l2.weight.float(), l2.bias.float())

    def margin_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_exec - w_skip, b_exec - b_skip)`` of a linear router: its whole decision rule."""
        if self.router_type != "linear":
            raise ValueError("only a linear router reduces to one margin vector")
        w, b = self.weight_predictor.weight.float(), self.weight_predictor.bias.float()
        return (w[0] - w[1]) * self.input_scale.float(), b[0] - b[1]
