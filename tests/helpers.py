"""Assertions that say where they fail, the weight set-ups the parity tests share, and backends
declared for one test."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastvit.attention import BACKENDS, Backend, register_backend
from fastvit.attention.reference import reference_attention

# The ViT the SSL wrappers' tests train: 32 px, 4 x 4 patches of 8, width 32, 2 blocks of 2 heads.
SMALL_VIT = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)


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


def assert_matches_vit_pytorch(make_pair, input_shape: tuple, *, what: str, train: bool = False,
                               out_shape: tuple | None = None, atol: float = 1e-5, rtol: float = 1e-5,
                               **kwargs):
    """``fast, ref = make_pair(**kwargs)`` (a ``pair_of_models`` partial), in train mode if ``train``, agree
    on one ``torch.randn(*input_shape)`` drawn after both are built (``assert_pair_matches``). Returns
    fastvit's output."""
    fast, ref = make_pair(**kwargs)
    if train:
        fast.train(), ref.train()
    return assert_pair_matches(fast, ref, torch.randn(*input_shape), what=what, out_shape=out_shape, atol=atol,
                               rtol=rtol)


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


def seeded_outputs(seed: int, x: torch.Tensor, *models: nn.Module, backward: bool = False) -> list:
    """Each model's output on ``x`` with the global RNG reset to ``seed`` before each call (random masks
    and dropout then match), in the order given: without gradients, or each output backpropagated."""
    outputs = []
    with torch.set_grad_enabled(backward):
        for model in models:
            torch.manual_seed(seed)
            outputs.append(model(x))
            if backward:
                outputs[-1].backward()
    return outputs


def losses_with_backward(fast: nn.Module, ref: nn.Module, img: torch.Tensor, seed: int = 1) -> tuple:
    """Both training losses under the same seed, each backpropagated: ``(fast_loss, ref_loss)``."""
    ref_loss, fast_loss = seeded_outputs(seed, img, ref, fast, backward=True)
    return fast_loss, ref_loss


def assert_grads_match(fast: nn.Module, ref: nn.Module, *, what: str, ref_grad_for=None) -> int:
    """Every parameter's gradient matches vit-pytorch's (none where it has none, atol 2e-5, rtol 1e-4);
    returns how many were compared.

    Args:
        ref_grad_for: ``(name, ref_grad, param) -> ref_grad`` in fastvit's layout; default: reshaped to
            the parameter's shape.
    """
    ref_params = dict(ref.named_parameters())
    compared = 0
    for name, param in fast.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:
            assert param.grad is None or not param.grad.any(), f"{what}: {name} has a gradient, vit-pytorch none"
            continue
        ref_grad = ref_grad_for(name, ref_grad, param) if ref_grad_for else ref_grad.reshape(param.shape)
        assert param.grad is not None, f"{what}: {name} has no gradient"
        assert_close(param.grad, ref_grad, atol=2e-5, rtol=1e-4, what=f"{what} grad {name}")
        compared += 1
    return compared


def assert_masked_pretraining_matches(fast: nn.Module, ref: nn.Module, vit_kwargs: dict, *, what: str,
                                      loss_atol: float, min_grads: int, ref_grad_for=None) -> None:
    """A masked-image-modelling wrapper (MAE, SimMIM) against vit-pytorch's on a batch of 3 images of the
    encoder's size: the two losses under the same seed agree (rtol 1e-5), at least ``min_grads``
    parameter gradients agree (``assert_grads_match``), the mask token and the encoder's position table
    get a gradient and its classifier none."""
    size = vit_kwargs["image_size"]
    img = torch.randn(3, vit_kwargs.get("channels", 3), *(size if isinstance(size, tuple) else (size, size)))
    fast_loss, ref_loss = losses_with_backward(fast, ref, img)
    assert torch.isfinite(ref_loss) and ref_loss > 0
    assert_close(fast_loss, ref_loss, atol=loss_atol, rtol=1e-5, what=f"{what} loss")
    assert assert_grads_match(fast, ref, what=what, ref_grad_for=ref_grad_for) >= min_grads
    assert fast.mask_token.grad.abs().sum() > 0 and fast.encoder.pos_embedding.grad.abs().sum() > 0
    assert fast.encoder.mlp_head.weight.grad is None  # the classifier is not used


# Ops that read a tensor on the host (a device sync on CUDA).
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.is_nonzero",
            "aten.equal", "aten.unique", "aten._unique2"}


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def assert_vectorised_without_host_syncs(model: nn.Module, image_size: tuple, channels: int = 3) -> None:
    """``model(images).backward()`` runs the same ops at batch 2 and 5 (no per-sample loop), none of them
    reading a tensor on the host (``SYNC_OPS``)."""
    recorded = []
    for batch in (2, 5):
        model.zero_grad(set_to_none=True)  # the same backward ops (no accumulation into existing grads)
        with _OpRecorder() as rec:
            model(torch.randn(batch, channels, *image_size)).backward()
        recorded.append(rec.ops)
    first_diff = next((i for i, (a, b) in enumerate(zip(*recorded)) if a != b), None)
    assert len(recorded[0]) == len(recorded[1]) and first_diff is None, (
        f"{len(recorded[0])} vs {len(recorded[1])} ops, first difference at {first_diff}")
    assert not SYNC_OPS & set(recorded[0]), sorted(SYNC_OPS & set(recorded[0]))


def backend_class(name: str, forward=None, **capabilities) -> type:
    """A ``Backend`` declared for one test: capabilities as keywords (``devices`` defaults to the CPU),
    ``forward(inp)`` the reference's unless given; ``calls`` counts the forward calls."""

    def forward_and_count(cls, inp):
        cls.calls += 1
        return (forward or reference_attention)(inp)

    attributes = {"name": name, "devices": ("cpu",), "calls": 0, **capabilities,
                  "forward": classmethod(forward_and_count)}
    return type(f"ForTest_{name}", (Backend,), attributes)


@contextlib.contextmanager
def registered(backend: type):
    """``backend`` selectable by name (a new name) inside the with-block, unregistered after it."""
    assert backend.name not in BACKENDS, backend.name
    register_backend(backend)
    try:
        yield backend
    finally:
        BACKENDS.pop(backend.name, None)


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
