"""``patch_timm(model, linear=True)``: every ``nn.Linear`` becomes ``fastvit.layers.Linear`` (prepacked
oneDNN weights in CPU inference, same parameters) and timm's ``Mlp`` fuses its exact GELU into
``fc1``'s GEMM. Elsewhere (training, CUDA, torch.compile) both run what timm runs."""

from __future__ import annotations

import torch
from timm.layers import Mlp as TimmMlp
from timm.layers.activations import GELU as TimmGELU
from torch import Tensor, nn

from fastvit.layers import Linear as FastLinear

from ._patch import Patched, patches


@patches(nn.Linear, kind="linear")
class Linear(Patched, FastLinear):
    pass


def _exact_gelu(act: nn.Module) -> bool:
    return type(act) is TimmGELU or (type(act) is nn.GELU and act.approximate == "none")


@patches(TimmMlp, kind="mlp")
class Mlp(Patched, TimmMlp):
    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        # Only an exact GELU after a Linear fuses (a conv MLP or another activation keeps timm's Mlp).
        return isinstance(module.fc1, nn.Linear) and _exact_gelu(module.act)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # forward_act is Python-only: timm's own forward (see _patch)
            return self._timm_forward(x)
        x = self.fc1.forward_act(x, "gelu") if isinstance(self.fc1, FastLinear) else self.act(self.fc1(x))
        return self.drop2(self.fc2(self.norm(self.drop1(x))))
