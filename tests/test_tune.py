"""`fastvit tune` end to end on the CPU (Triton interpreter): every bucket timed, the fastest kept, the
table written, and the launchers then reading it."""

from __future__ import annotations

import json

import pytest
import torch

from fastvit import cli

kattn = pytest.importorskip("fastvit.kernels.attention")
kattn_configs = pytest.importorskip("fastvit.kernels.attention_configs")


def _tune(tmp_path, *extra):
    table, report = tmp_path / "cpu.json", tmp_path / "report.json"
    rc = cli.main(["tune", "--device", "cpu", "--quick", "--shapes", "levit_256_stage2", "--max-configs", "2",
                   "--bucket-seconds", "0.01", "--tuned-out", str(table), "--json", str(report), *extra])
    return rc, table, report


def test_tune_times_every_bucket_and_writes_the_table_the_launchers_read(tmp_path, monkeypatch):
    rc, table, report = _tune(tmp_path)
    assert rc == 0
    doc = json.loads(report.read_text())
    assert {b["kernel"] for b in doc["buckets"]} == set(kattn.TUNABLE_KERNELS)
    for bucket in doc["buckets"]:
        timed = [c for c in bucket["candidates"] if c["ms"] is not None]
        assert len(bucket["candidates"]) <= 2 and timed
        assert bucket["best"]["ms"] == min(c["ms"] for c in timed)
    loaded = kattn.load_tuned(str(table))
    assert set(loaded["entries"]) == set(doc["entries"]) and len(loaded["entries"]) == 3

    # The launchers pick the tuned config for a shape in the bucket: write a table whose forward entry
    # is a config the heuristic would not choose first, and look it up where the launchers look.
    B, H, Nq, Nk, D, Dv = next(b["dims"] for b in doc["buckets"] if b["kernel"] == "_attn_fwd")
    key = kattn.tune_key("_attn_fwd", Nq, Nk, D, Dv, torch.float32, True)
    default = kattn.launch_plan(Nq, Nk, D, Dv, torch.float32, biased=True)["_attn_fwd"][0]
    other = next(c for c in kattn.candidate_configs("_attn_fwd", Nq, Nk, D, Dv, torch.float32, True) if c != default)
    raw = json.loads(table.read_text())
    raw["entries"][key] = {**other._asdict(), "ms": 1.0}
    monkeypatch.setattr(kattn_configs, "TUNED_DIR", str(tmp_path))
    (tmp_path / (kattn.device_slug("cpu") + ".json")).write_text(json.dumps(raw))
    picked = kattn._pick_config("_attn_fwd", Nq, Nk, kattn._head_blocks(D, Dv), torch.float32,
                                kattn._bias_kind(True, Nq, Nk), torch.device("cpu"))
    assert picked == other != default


def test_tune_merges_into_an_existing_table(tmp_path):
    table = tmp_path / "cpu.json"
    table.write_text(json.dumps({"device": "x", "entries": {
        "_attn_fwd|bf16|d64x64|none|m256|n256": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}}}))
    rc, table, _ = _tune(tmp_path)
    assert rc == 0
    entries = json.loads(table.read_text())["entries"]
    assert "_attn_fwd|bf16|d64x64|none|m256|n256" in entries and len(entries) == 4


def test_tune_rejects_an_unknown_shape(tmp_path, capsys):
    assert cli.main(["tune", "--device", "cpu", "--quick", "--shapes", "no_such_model*"]) == 2
    assert "no attention shape matches" in capsys.readouterr().err
