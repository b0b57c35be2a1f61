"""Assertions that say where they fail, and the weight set-ups the parity tests share."""

from __future__ import annotations

import torch
from torch import nn


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = "") -> None:
    """Like torch.testing.assert_close, but reports the worst element, its index and the failing fraction."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(e).any() or torch.isnan(a).any():
        nan_a, nan_e = bool(torch.isnan(a).any()), bool(torch.isnan(e).any())
        raise AssertionError(f"{what}: NaN in actual={nan_a} expected={nan_e}")
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(err), err.shape))
        raise AssertionError(
            f"{what}: max abs err {err.max().item():.3e} at {idx} (actual {a[idx].item():.6g}, expected "
            f"{e[idx].item():.6g}); {bad.float().mean().item():.2%} of {err.numel()} elements exceed "
            f"atol={atol:g} rtol={rtol:g}"
        )


def assert_pair_matches(fast, ref, x, *, what: str, out_shape: tuple | None = None, atol: float = 1e-5,
                        rtol: float = 1e-5):
    """fastvit's and vit-pytorch's outputs for the same input (no grad) agree within atol / rtol, and
    fastvit's has ``out_shape`` when given. Returns fastvit's output."""
    with torch.no_grad():
        out = fast(x)
        if out_shape is not None:
            assert tuple(out.shape) == tuple(out_shape), f"{what}: output shape {tuple(out.shape)} != {out_shape}"
        assert_close(out, ref(x), atol=atol, rtol=rtol, what=what)
    return out


def randomize_batchnorms(model: nn.Module, seed: int = 1, gamma_mean: float = 1.0, gamma_std: float = 0.5) -> None:
    """Fresh BatchNorms are the identity in eval (and LeViT's output BNs start at gamma = 0): give every
    BatchNorm2d random affine parameters and running statistics, so parity tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gamma_std + gamma_mean)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def randomize_channel_norms(model: nn.Module, scale: float = 0.2) -> None:
    """vit-pytorch's channel LayerNorms (parameters ``g``, ``b``) start at 1 and 0: move them away."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".g", ".b")):
                p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith(".g") else 0.0))


def losses_with_backward(fast: nn.Module, ref: nn.Module, img: torch.Tensor, seed: int = 1) -> tuple:
    """Both training losses under the same seed, each backpropagated: ``(fast_loss, ref_loss)``."""
    torch.manual_seed(seed)
    ref_loss = ref(img)
    ref_loss.backward()
    torch.manual_seed(seed)
    fast_loss = fast(img)
    fast_loss.backward()
    return fast_loss, ref_loss


def pair_of_models(fast_cls, ref_cls, *, fast_kwargs: dict | None = None, ref_kwargs: dict | None = None,
                   prepare=None, **kwargs) -> tuple:
    """vit-pytorch's model (seed 0) and fastvit's loaded from its state_dict, both in eval: ``(fast, ref)``.

    Args:
        fast_cls, ref_cls: the two constructors.
        fast_kwargs, ref_kwargs: arguments for one side only (fastvit's flags, vit-pytorch's spelling).
        prepare: called on the reference before its weights are copied (``randomize_batchnorms``, ...).
        kwargs: the arguments both take.
    """
    torch.manual_seed(0)
    ref = ref_cls(**kwargs, **(ref_kwargs or {})).eval()
    if prepare is not None:
        prepare(ref)
    fast = fast_cls(**kwargs, **(fast_kwargs or {})).eval()
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    return fast, ref
