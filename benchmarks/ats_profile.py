"""ATS-ViT on the CPU: fastvit vs vit-pytorch (same weights, eval, inference_mode), and where time goes.

    python benchmarks/ats_profile.py [--config seed|small|tiny|deit_s] [--batch 4] [--threads N]
                                     [--fixed-widths] [--profile]

Prints the median time of each model (alternating repetitions in one process), the ratio
vit-pytorch / fastvit and the ratio of the best times (robust to other load on a shared machine);
``--profile`` adds a torch.profiler table of the fastvit forward. fastvit runs with its CPU default
(kept sets trimmed to the batch's widest); ``--fixed-widths`` times the fixed-width path instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIGS = {
    # The seed README example.
    "seed": dict(image_size=256, patch_size=16, num_classes=1000, dim=1024, depth=6,
                 max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=16, mlp_dim=2048),
    # The seed example shrunk in width (same tokens, heads and sampling schedule).
    "small": dict(image_size=256, patch_size=16, num_classes=1000, dim=256, depth=6,
                  max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=8, dim_head=32, mlp_dim=512),
    "tiny": dict(image_size=256, patch_size=16, num_classes=1000, dim=128, depth=6,
                 max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=4, dim_head=32, mlp_dim=256),
    # ATS-DeiT-S shape (fastvit preset ats_vit_small_patch16_224).
    "deit_s": dict(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536,
                   max_tokens_per_depth=(196,) * 3 + (128,) * 3 + (64,) * 3 + (32,) * 3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="seed", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fixed-widths", action="store_true", help="fastvit with trim_padding=False")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from fastvit.ats_vit import ViT
    from vit_pytorch.ats_vit import ViT as ReferenceViT

    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    reference = ReferenceViT(**cfg).eval()
    model = ViT(**cfg, trim_padding=False if args.fixed_widths else None).eval()
    model.load_vit_pytorch_state_dict(reference.state_dict())
    x = torch.randn(args.batch, 3, cfg["image_size"], cfg["image_size"])
    with torch.inference_mode():
        torch.manual_seed(1)
        a = reference(x)
        torch.manual_seed(1)
        b = model(x)
        print(f"max |logit diff| {(a - b).abs().max().item():.2e}")
        for _ in range(2):  # warm-up
            reference(x), model(x)
        times = {"vit-pytorch": [], "fastvit": []}
        for _ in range(args.reps):  # alternate the contenders to cancel drift on a shared machine
            for name, fn in (("vit-pytorch", reference), ("fastvit", model)):
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
        ref, fast = statistics.median(times["vit-pytorch"]), statistics.median(times["fastvit"])
        best = min(times["vit-pytorch"]) / min(times["fastvit"])
        print(f"{args.config} batch {args.batch}: vit-pytorch {ref * 1e3:.1f} ms, "
              f"fastvit {fast * 1e3:.1f} ms (medians of {args.reps}), speed-up {ref / fast:.2f}x "
              f"(best-of: {best:.2f}x)")
        if args.profile:
            from torch.profiler import profile

            with profile(record_shapes=True) as prof:
                model(x)
            averages = prof.key_averages(group_by_input_shape=True)
            print(averages.table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
