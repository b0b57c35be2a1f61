"""``fastvit attention-map``: real PNGs over a generated image for several architectures (ViT, CaiT's
class attention, PiT and CvT hierarchies, T2T, CrossViT, NesT), rollout and last-layer modes, checkpoints loaded
strictly, and clear errors for models, images and checkpoints it cannot use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pictures import assert_picture
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch import nn

from fastvit import cli
from fastvit.models import get_model_entry
from fastvit.tools.attention_map import AttentionMapError, attention_map, token_layout, token_scores

IMAGE_SIZE = (120, 90)  # (width, height): not the model's size, not square


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    img = Image.new("RGB", IMAGE_SIZE, (40, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((65, 15, 110, 60), fill=(230, 200, 40))
    draw.rectangle((8, 55, 50, 85), fill=(200, 30, 30))
    path = tmp_path_factory.mktemp("image") / "shapes.png"
    img.save(path)
    return path


def small(name: str) -> nn.Module:
    entry = get_model_entry(name)
    torch.manual_seed(0)
    return entry.build(**entry.test_overrides)


def assert_overlay(path, image_path):
    """A picture of the image's size that is not the image: the heatmap was blended in."""
    pixels = assert_picture(path, size=IMAGE_SIZE)
    with Image.open(image_path) as original:
        assert (pixels != np.asarray(original.convert("RGB"))).any()


@pytest.mark.parametrize("name, mode, used, how", [
    ("vit_small_patch16_224", "rollout", "rollout", "rollout over 2 layers (CLS attention)"),
    ("vit_small_patch16_224", "last", "last", "layer 2 of 2 (CLS attention)"),
    ("cait_xxs24_224", "rollout", "rollout", "then the CLS row of class attention"),
    ("pit_ti_224", "rollout", "rollout", "(CLS attention)"),
    ("cvt_13", "rollout", "last", "rollout impossible"),
    ("t2t_vit_14", "rollout", "rollout", "(CLS attention)"),
    ("crossvit_tiny_240", "last", "last", "(CLS attention)"),
    ("nest_tiny_224", "last", "last", "(mean attention received)"),
])
def test_families_draw_their_attention_over_the_image(image_path, tmp_path, name, mode, used, how):
    out = tmp_path / f"{name}-{mode}.png"
    result = attention_map(name, str(image_path), str(out), mode=mode, module=small(name))
    assert (result.mode, result.path) == (used, str(out))
    assert how in result.description, result.description
    assert result.scores.shape == result.grid and result.grid[0] * result.grid[1] >= 4
    assert result.scores.min() == 0 and result.scores.max() == 1
    assert_overlay(out, image_path)


@pytest.mark.parametrize("name, mode", [("vit_tiny_patch16_224", "rollout"), ("pit_ti_224", "last"),
                                        ("cvt_13", "rollout")])
def test_command_draws_full_size_presets(image_path, tmp_path, capsys, name, mode):
    out = tmp_path / "maps" / "map.png"  # the folder is made
    assert cli.main(["attention-map", "--model", name, "--image", str(image_path), "--mode", mode,
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out.replace("\n", " ")
    assert f"wrote {out} ({name}:" in printed and "tokens)" in printed, printed
    assert_overlay(out, image_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoints_load_strictly(image_path, tmp_path, suffix):
    from safetensors.torch import save_file

    trained = small("vit_small_patch16_224")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": trained.state_dict()}, path)  # a wrapped state_dict is unwrapped
    fresh = small("vit_small_patch16_224")
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    out = tmp_path / "map.png"
    with_weights = attention_map("vit_small_patch16_224", str(image_path), str(out), checkpoint=str(path),
                                 module=fresh)
    reference = attention_map("vit_small_patch16_224", str(image_path), str(tmp_path / "ref.png"), module=trained)
    torch.testing.assert_close(with_weights.scores, reference.scores)

    other = small("pit_ti_224")
    with pytest.raises(AttentionMapError, match=r"does not fit pit_ti_224: Error\(s\) in loading state_dict "
                                                r"for PiT: Missing key"):
        attention_map("pit_ti_224", str(image_path), str(out), checkpoint=str(path), module=other)


def test_command_errors_exit_2_with_the_reason(image_path, tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    bad_checkpoint = tmp_path / "bad.pt"
    bad_checkpoint.write_text("garbage")
    truncated = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:500])
    cases = [
        (["--model", "vit_small", "--image", str(image_path)], "unknown model 'vit_small'"),
        (["--model", "vit_tiny_patch16_224", "--image", str(tmp_path / "missing.png")], "no such file"),
        (["--model", "vit_tiny_patch16_224", "--image", str(not_an_image)], "cannot be read"),
        (["--model", "vit_tiny_patch16_224", "--image", str(image_path), "--checkpoint", str(bad_checkpoint)],
         f"{bad_checkpoint}: truncated, damaged or not a plain state dict"),
        (["--model", "vit_tiny_patch16_224", "--image", str(image_path), "--checkpoint", str(truncated)],
         f"{truncated}: truncated safetensors file"),
        (["--model", "mobilevit_xxs", "--image", str(image_path)], "mobilevit_xxs: none of the"),
    ]
    for args, message in cases:
        out = tmp_path / "never.png"
        assert cli.main(["attention-map", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.replace("\n", " ")
        assert message in err, (args, err)
        assert not out.exists()


def test_a_model_without_fastvit_attention_is_refused_by_name(image_path, tmp_path):
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(AttentionMapError, match="my_convnet has no fastvit attention layer"):
        attention_map("my_convnet", str(image_path), str(tmp_path / "x.png"), module=convnet)


def test_token_layout_reads_prefix_tokens_and_the_grid():
    assert token_layout(197) == (1, 14, 14)
    assert token_layout(196) == (0, 14, 14)
    assert token_layout(198) == (2, 14, 14)
    assert token_layout(50) == (1, 7, 7)
    assert token_layout(32, aspect=0.5) == (0, 4, 8)
    assert token_layout(7) is None


def test_rollout_follows_attention_through_the_layers():
    """Layer 1 sends every token to token 5, layer 2 sends CLS to token 3: the flow ends at token 5."""
    n = 1 + 16
    first = torch.zeros(1, 2, n, n)
    first[..., :, 1 + 5] = 1.0
    second = torch.zeros(1, 2, n, n)
    second[..., :, 1 + 3] = 1.0
    scores, mode, how = token_scores([first, second], mode="rollout")
    assert mode == "rollout" and "rollout over 2 layers (CLS attention)" == how
    assert scores.shape == (4, 4) and scores.flatten().argmax() == 5
    last, mode, _ = token_scores([first, second], mode="last")
    assert mode == "last" and last.flatten().argmax() == 3
    uniform = torch.full((1, 2, 16, 16), 1 / 16)  # no CLS: the mean attention each token receives
    scores, _, how = token_scores([uniform], mode="rollout")
    assert "mean attention received" in how and torch.allclose(scores, torch.full((4, 4), 1 / 16))
