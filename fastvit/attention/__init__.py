"""fastvit's attention layer: one contract, many backends.

    from fastvit.attention import attend, RelPosBias, DenseBias, KeyPaddingMask
    out = attend(q, k, v, bias=RelPosBias(table, index))   # q, k, v: [B, H, N, D]
    out = attend(q, k, v, window=Window(grid=(56, 56), size=(7, 7), shift=(3, 3)))  # Swin-style windows
    out = attend(q, k, v, packed=Packed([196, 49, 120]))  # three sequences in one [1, H, 365, D] call
"""

from .api import attend, explain_call, make_inputs
from .backends import BACKENDS, Backend, get_backend, register_backend
from .bias import DenseBias, HeadMix, KeyBias, KeyPaddingMask, RelPosBias
from .dispatch import auto_order, choose, explain, get_selected_backend, set_backend, use_backend
from .inputs import DTYPES, AttnInputs, AttnOutput, dtype_name
from .packed import Packed
from .plan import clear_plans, plan_info
from .window import Window

__all__ = [
    "attend", "explain_call", "make_inputs",
    "RelPosBias", "DenseBias", "KeyBias", "KeyPaddingMask", "HeadMix", "Window", "Packed",
    "AttnInputs", "AttnOutput", "DTYPES", "dtype_name",
    "BACKENDS", "Backend", "get_backend", "register_backend",
    "choose", "explain", "auto_order", "use_backend", "set_backend", "get_selected_backend",
    "clear_plans", "plan_info",
]
