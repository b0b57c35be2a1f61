"""Tiles fitted to short sequences (``attention_configs.fit_config``): at most 16 queries run in a
16-row tile, and a 16 x 16 attention in a 16 x 16 one, in the forward and the one-pass backward,
where the spill table keeps the fitted config (else the listed one). LeViT's last stage (16 tokens,
and its 16-query subsample over 49 keys) and class attention (one query) are the models' cases."""

from __future__ import annotations

import pytest
from fastvit.kernels import attention as kattn
from fastvit.kernels import attention_configs as kattn_configs
from fastvit.kernels.configs import Config
from kernel_cases import BF16, F16, F32, run_and_compare, triton_case


@pytest.mark.parametrize("cfg, nq, nk, fitted", [
    (Config(64, 64, 4, 2), 16, 16, Config(16, 16, 2, 1)),  # LeViT's last stage
    (Config(64, 64, 4, 2), 16, 49, Config(16, 64, 4, 2)),  # its subsample: short queries only
    (Config(64, 64, 8, 2), 1, 197, Config(16, 64, 4, 2)),  # class attention
    (Config(32, 32, 4, 2), 9, 12, Config(16, 16, 2, 1)),
    (Config(64, 32, 4, 2), 16, 32, Config(16, 32, 2, 2)),
    (Config(64, 64, 4, 2), 17, 16, Config(64, 64, 4, 2)),  # 17 queries: the listed tiles
    (Config(64, 64, 4, 2), 197, 8, Config(64, 64, 4, 2)),  # a short key side alone is not fitted
    (Config(16, 16, 4, 1), 4, 4, Config(16, 16, 4, 1)),  # already that small
])
def test_fit_config(cfg, nq, nk, fitted):
    assert kattn_configs.fit_config(cfg, nq, nk) == fitted


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), None])
def test_short_sequences_launch_fitted_tiles(capability):
    # useful work: 16 x 16 in one tile; 16 x 49 in 16 x 64; one query over 50 keys in 16 x 64 (was 64 x 64)
    for (nq, nk), useful in (((16, 16), 1.0), ((16, 49), 49 / 64), ((1, 50), 50 / (16 * 64))):
        plan = kattn.launch_plan(nq, nk, 32, 64, BF16, biased=True, capability=capability)
        for kernel in ("_attn_fwd", "_attn_bwd_onepass"):
            cfg = plan[kernel][0]
            assert cfg.block_m == 16, f"{nq}x{nk} {kernel}: {cfg}"
            assert kattn_configs.tile_work(kernel, nq, nk, cfg).useful == round(useful, 4), (nq, nk, kernel, cfg)
    # ViT lengths keep the listed tiles
    plan = kattn.launch_plan(197, 197, 64, 64, BF16, capability=(9, 0))
    assert plan["_attn_fwd"][0] == kattn_configs._FWD_PREFS[("16bit", "long")][0]


def test_a_fitted_config_the_spill_table_prunes_gives_way_to_the_next_fit_then_the_listed_one(monkeypatch):
    blocks, kind = (32, 64), "dense"
    prefs = kattn_configs._ONEPASS_PREFS["16bit"]
    listed = kattn_configs._kept_pick(prefs, "_attn_bwd_onepass", BF16, blocks, kind, (9, 0))
    both = kattn_configs._pick_onepass_config(16, 16, blocks, BF16, kind, (9, 0))
    assert both == kattn_configs.fit_config(listed, 16, 16) and (both.block_m, both.block_n) == (16, 16)

    def prune(*configs):
        monkeypatch.setattr(kattn_configs, "PRUNED", kattn_configs.PRUNED | {
            ("_attn_bwd_onepass", c, "16bit", blocks, kind, 90) for c in configs})

    prune(*{kattn_configs.fit_config(c, 16, 16) for c in prefs})  # no 16 x 16 tile: 16 queries per tile
    query_fit = kattn_configs._pick_onepass_config(16, 16, blocks, BF16, kind, (9, 0))
    assert query_fit.block_m == 16 and query_fit.block_n > 16
    prune(*{kattn_configs.fit_config(c, 16, 1 << 30) for c in prefs})  # no fitted tile at all: as listed
    assert kattn_configs._pick_onepass_config(16, 16, blocks, BF16, kind, (9, 0)) == listed
    # the other capability keeps its fitted pick
    assert kattn_configs._pick_onepass_config(16, 16, blocks, BF16, kind, (8, 0)).block_m == 16


def test_tuning_candidates_lead_with_the_fitted_pick():
    candidates = kattn_configs.candidate_configs("_attn_fwd", 16, 16, 32, 32, BF16, False, capability=(9, 0))
    assert candidates[0] == Config(16, 16, 2, 1)
    assert len(candidates) == len(set(candidates)) and any(c.block_m == 64 for c in candidates)


# Fitted tiles against the reference, forward and backward: exactly one tile, a partial one (class
# attention, 9 or 12 tokens), a fitted query side over several key blocks, every bias kind.
FITTED_CASES = [
    triton_case(BF16, (2, 3, 16, 16, 32, 64), "relpos"),  # LeViT-256's last stage
    triton_case(F16, (2, 2, 16, 49, 32, 64), "relpos+padding"),  # its subsample
    triton_case(F32, (2, 2, 1, 197, 48, 48), "dense_bcast_heads"),  # class attention
    triton_case(F32, (3, 2, 9, 12, 16, 16), "relpos+dense_bcast+padding"),
    triton_case(BF16, (2, 2, 12, 100, 64, 64), "none"),
]


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("case", FITTED_CASES, ids=lambda c: c.id)
def test_fitted_tiles_match_the_reference(case, monkeypatch):
    blocks = []
    real = kattn._launch

    def recording(kernel, grid, args, constexprs, cfg):
        if kernel.__name__ in kattn_configs.FITTED_KERNELS:
            blocks.append((kernel.__name__, constexprs["BLOCK_M"], constexprs["BLOCK_N"]))
        real(kernel, grid, args, constexprs, cfg)

    monkeypatch.setattr(kattn, "_launch", recording)
    run_and_compare(case, fp32_table=True)
    nq, nk = case.shape[2], case.shape[3]
    # the one pass where the installed triton's spill table has a clean config (else the three passes)
    plan = kattn.launch_plan(nq, nk, case.shape[4], case.shape[5], case.dtype, biased=case.bias != "none")
    expected = {"_attn_fwd"} | ({"_attn_bwd_onepass"} if "_attn_bwd_onepass" in plan else set())
    assert {name for name, _, _ in blocks} == expected, blocks
    assert all(bm == 16 and (bn == 16) == (nk <= 16) for _, bm, bn in blocks), (nq, nk, blocks)
