"""``fastvit train --data digits``: scikit-learn's bundled handwritten digits as a real, tiny data set.
A small ViT trained on it for ~30 s on this CPU reaches >= 95% on the held-out 359 images, and token
merging at half its tokens over the depth (``fastvit.merge_tokens``, no retraining) keeps it within
2 points."""

from __future__ import annotations

import pytest
import torch

import fastvit
from fastvit.train import TrainConfig, train
from fastvit.train.config import TrainError

pytest.importorskip("sklearn", reason="scikit-learn is a dev dependency (pip install 'fastvit[train]')")

from fastvit.train.data import DigitsImages  # noqa: E402  (needs scikit-learn)

# A ViT-Ti-shaped model on 32 x 32 upsampled digits: 8 x 8 patches of 4 pixels, 64 tokens + CLS.
DIGITS_VIT = dict(model="vit_tiny_patch16_224", num_classes=10, image_size=32,
                  model_args=dict(patch_size=4, dim=64, depth=4, heads=4, mlp_dim=128))


def test_the_split_is_fixed_disjoint_and_covers_the_set():
    train_set, test_set = DigitsImages((16, 16), train=True, normalize=False), DigitsImages((16, 16), False, False)
    assert (len(train_set), len(test_set)) == (1438, 359)
    image, label = train_set[0]
    assert image.shape == (3, 16, 16) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert 0 <= label < 10 and train_set.classes == [str(c) for c in range(10)]
    assert torch.equal(DigitsImages((16, 16), True, False).images, train_set.images)  # no dependence on state
    flat = lambda ds: {tuple(x.flatten().tolist()) for x in ds.images[:, 0]}  # noqa: E731
    assert not flat(train_set) & flat(test_set)  # (the set has no duplicate images)
    assert set(test_set.labels.tolist()) == set(range(10))
    grey = DigitsImages((8, 8), train=False, normalize=False, channels=1)
    assert grey[0][0].shape == (1, 8, 8)


def test_val_data_digits_needs_data_digits(tmp_path):
    with pytest.raises(TrainError, match="--val-data digits .* needs --data digits"):
        TrainConfig(model="vit_tiny_patch16_224", synthetic=8, val_data="digits", out=str(tmp_path)).validate()
    with pytest.raises(TrainError, match="or 'digits'"):
        TrainConfig(model="vit_tiny_patch16_224", data="digitz", out=str(tmp_path)).validate()


def test_a_small_vit_learns_the_digits(tmp_path):
    trained = {}
    cfg = TrainConfig(data="digits", out=str(tmp_path), epochs=6, batch_size=32, lr=2e-3, warmup_epochs=1,
                      log_every=1000, **DIGITS_VIT)
    summary = train(cfg, on_step=lambda info: trained.update(module=info["module"]))
    accuracy = summary["metrics"]["val_top1"]
    assert accuracy >= 95.0, f"held-out top-1 {accuracy:.2f}% after {summary['step']} steps"
    model = trained["module"].eval()
    test_set = DigitsImages((32, 32), train=False, normalize=True)  # as the run's loader (a supervised task)

    def top1(m):
        with torch.inference_mode():
            return (m(test_set.images).argmax(-1) == test_set.labels).double().mean().item() * 100

    assert top1(model) == pytest.approx(accuracy, abs=1e-6)  # the run's number is the model's
    # 64 patch tokens, 4 blocks: 8 merged away per block leaves 32 at the last one, half of them
    merged = fastvit.merge_tokens(model, 8)
    merged_accuracy = top1(merged)
    assert merged_accuracy >= accuracy - 2.0, f"merged {merged_accuracy:.2f}% vs unmerged {accuracy:.2f}%"
    assert top1(fastvit.merge_tokens(merged, None)) == accuracy  # restored exactly
