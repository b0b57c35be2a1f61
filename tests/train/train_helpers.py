"""What the training tests share: a tiny model's flags, SSL wrapper sizes, image folders, torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# vit_tiny_patch16_224 shrunk to dim 32, depth 1, 32x32 images (16 patches).
TINY = ["--model", "vit_tiny_patch16_224", "--workers", "0", "--log-every", "1",
        *[arg for kv in ("image_size=32", "patch_size=8", "dim=32", "depth=1", "heads=2", "dim_head=16",
                         "mlp_dim=64") for arg in ("--model-arg", kv)]]

SSL_ARGS = {
    "mae": ["--ssl-arg", "decoder_dim=16", "--ssl-arg", "decoder_heads=2", "--ssl-arg", "decoder_dim_head=8"],
    "simmim": [],
    "mpp": [],
    "dino": ["--ssl-arg", "num_classes_K=32", "--ssl-arg", "projection_hidden_size=32"],
}


def write_image_folder(root: str, classes: int, per_class: int, size: tuple = (40, 48), seed: int = 0) -> str:
    """An ImageFolder of small PNGs (and one JPEG per class): class ``c`` is noise around its own colour."""
    from torchvision.io import encode_jpeg, write_png

    g = torch.Generator().manual_seed(seed)
    for c in range(classes):
        folder = os.path.join(root, f"class_{c}")
        os.makedirs(folder, exist_ok=True)
        colour = torch.rand(3, 1, 1, generator=g) * 255
        for i in range(per_class):
            img = (0.5 * colour + 0.5 * torch.rand(3, *size, generator=g) * 255).to(torch.uint8)
            if i == 0:
                with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                    f.write(encode_jpeg(img).numpy().tobytes())
            else:
                write_png(img, os.path.join(folder, f"{i}.png"))
    return root


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def latest_state(out: str) -> dict:
    with open(os.path.join(out, "checkpoints", "latest"), encoding="utf-8") as f:
        name = f.read().strip()
    with open(os.path.join(out, "checkpoints", name, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blocking_imports(folder: str, modules: tuple) -> dict:
    """Environment entries that make ``modules`` unimportable in a child Python (as if not installed): a
    ``sitecustomize`` in ``folder``, put first on PYTHONPATH, sets ``sys.modules[m] = None``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w", encoding="utf-8") as f:
        f.write("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return {"PYTHONPATH": folder + os.pathsep + os.environ.get("PYTHONPATH", "")}


def torchrun(args: list, nproc: int = 2, timeout: float = 600, env: dict = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc --master_port <free> *args`` (gloo on the CPU);
    ``env`` adds to the environment (a PYTHONPATH in it comes before the repository's); ``check``: it must
    succeed."""
    extra = dict(env or {})
    path = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", ""), REPO, os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                      f"{proc.stderr[-8000:]}")
    return proc
