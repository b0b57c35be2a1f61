"""Assertions that say where they fail."""

from __future__ import annotations

import torch


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
