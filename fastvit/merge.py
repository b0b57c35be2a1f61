"""``merge_tokens(model, r)``: Token Merging (ToMe) on a trained ViT, in place, no retraining.

    import fastvit
    model = fastvit.create_model("vit_small_patch16_224")
    fastvit.merge_tokens(model, 8)         # 8 tokens fewer after every block; returns the model
    fastvit.merge_tokens(model, [0] * 6 + [16] * 6)  # one value per block
    fastvit.merge_tokens(model, None)      # the original computation again (also r=0)

"Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv 2210.09461). The algorithm
(bipartite soft matching on the keys, size-weighted merging, proportional attention) is in
``fastvit.layers.merge``; this module applies it to models, as the authors' ``tome.patch`` does for
timm: it swaps the classes of the model and of its block runner for subclasses whose forward merges
(parameters, buffers and state_dict unchanged; ``isinstance`` holds). ``merge_tokens(model, None)``
swaps them back, so the restored model runs exactly its own code (bitwise-equal outputs).

Supported, with what is protected (never merged):

- fastvit ``ViT`` (``pool='cls'``: the CLS token; ``'mean'``: nothing), ``DistillableViT`` (CLS and
  the distillation token, laid out ``[CLS, DIST, patches]`` while merging; without a CLS token the
  distillation token goes first and is protected as one), ``DeepViT``, ``SimpleViT``, the pluggable
  ``fastvit.efficient.ViT`` (and its distillable variant) when its ``transformer`` is fastvit's own,
  ``CaiT`` (its patch blocks merge; the class-attention blocks see the merged patches with their sizes);
- ``MAE`` / ``SimMIM``: their encoder merges, for inference (``mae.encoder(img)``); their pre-training
  loss needs one encoded token per patch and refuses while merging is on;
- timm's ``VisionTransformer`` family (ViT, DeiT, DeiT III, distilled DeiT, ...; class token or
  average pooling), patched by ``fastvit.patch_timm`` or not: the blocks run here, their attention
  through ``attend()``.

Everything else is refused with a ``ValueError`` saying why (position-dependent attention biases such as
BEiT's relative positions and EVA's rotary embeddings have no meaning for a merged token). While
merging is on, ``forward_features`` returns the merged tokens, pooling is the models' own (a plain mean
for average pooling, as in the authors' code), and ``forward_intermediates`` refuses (blocks no longer
have a token per patch).

``r`` is the number of tokens each block removes: an int for every block, or a sequence with one value
per block (a block's ``r`` is clamped to half its mergeable tokens).
"""

from __future__ import annotations

import copyreg
from dataclasses import dataclass
from numbers import Integral
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

from fastvit.attention import attend
from fastvit.layers import (
    Attention,
    ContextAttention,
    DistillTokenMixin,
    ResidualBlocks,
    merge_heads,
    split_heads,
    split_qkv,
)
from fastvit.layers.merge import bipartite_soft_matching, merge_wavg, proportional_attention_bias
from fastvit.models.base import VisionModel
from fastvit.models.cait import CaiT, LayerScale, dropout_layers
from fastvit.models.cait import Transformer as CaiTBlocks
from fastvit.models.deepvit import DeepViT
from fastvit.models.efficient import ViT as EfficientViT
from fastvit.models.features import FeaturesOnly
from fastvit.models.simple_vit import SimpleViT
from fastvit.models.vit import ViT
from fastvit.ssl.mae import MaskedImageModeling

__all__ = ["merge_tokens", "is_merging"]

STATE = "_token_merge"  # instance attribute of a merging runner or model: its ``MergeState``

INTERMEDIATES_REFUSED = ("forward_intermediates returns every block's tokens on the patch grid, and with token "
                         "merging on the blocks have fewer tokens than patches: call fastvit.merge_tokens(model, "
                         "None) first")


@dataclass(frozen=True)
class MergeState:
    """What a merging runner needs: ``r`` per block, whether token 0 is a class token and (timm's distilled
    DeiT) token 1 a distillation token."""

    r: tuple
    class_token: bool
    distill_token: bool = False


# -- the public entry -------------------------------------------------------------------------------


def merge_tokens(model: nn.Module, r: Union[int, Sequence[int], None]) -> nn.Module:
    """Turn Token Merging on (``r`` tokens fewer after each block) or off (``None`` / 0), in place.

    Args:
        model: a supported model (module docstring); a model merging already gets the new ``r``.
        r: tokens each block removes: an int for every block, a sequence with one int per block, or
            ``None`` / ``0`` (all zeros) to restore the original computation exactly.

    Returns:
        ``model``.

    Raises:
        ValueError: an unsupported model (with the reason), or a bad ``r``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"merge_tokens needs an nn.Module, got {type(model).__name__}")
    schedule = _check_r(r)
    plan = _plan(model)  # validates the model (and refuses) before anything changes
    if schedule is None or not any(schedule if isinstance(schedule, tuple) else (schedule,)):
        _restore(model)
        return model
    swaps = []
    for module, mixin, depth, state in plan:
        if depth is not None:
            per_block = schedule if isinstance(schedule, tuple) else (schedule,) * depth
            if len(per_block) != depth:
                raise ValueError(f"r has {len(per_block)} values for the {depth} blocks of "
                                 f"{type(model).__name__}: give one per block, or an int")
            state = MergeState(per_block, *state)
        swaps.append((module, _merging_class(_unmerged(type(module)), mixin), state))
    _restore(model)
    for module, cls, state in swaps:
        module.__class__ = cls
        if state is not None:
            module.__dict__[STATE] = state
    return model


def is_merging(model: nn.Module) -> bool:
    """Whether ``merge_tokens`` is on in ``model`` (any of its modules)."""
    return any("_merged_from" in vars(type(m)) for m in model.modules())


def _check_r(r) -> Union[int, tuple, None]:
    def valid(v) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool) and v >= 0

    if r is None:
        return None
    if isinstance(r, (list, tuple)):
        if not all(valid(v) for v in r):
            raise ValueError(f"r must be a non-negative int or a sequence of them (one per block), got {r!r}")
        return tuple(int(v) for v in r)
    if not valid(r):
        raise ValueError(f"r must be a non-negative int or a sequence of them (one per block), got {r!r}")
    return int(r)


_CLASSES: dict = {}


def _merging_class(cls: type, mixin: type) -> type:
    """The subclass of ``cls`` with ``mixin`` first (one per pair), which ``_restore`` undoes."""
    key = (cls, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(cls.__name__, (mixin, cls), {"_merged_from": cls, "__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__})
    return _CLASSES[key]


def _new_merging(cls: type, mixin: type):
    """Unpickling: an empty instance of the merging subclass (``_Merging.__reduce_ex__``)."""
    return object.__new__(_merging_class(cls, mixin))


class _Merging:
    """Base of the merging mixins. The subclasses are made at run time, so a pickle (``torch.save``,
    ``copy.deepcopy``) names the model's own class and the mixin, and rebuilds the subclass on load."""

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        if not isinstance(reduced, tuple) or reduced[0] is not copyreg.__newobj__:
            raise TypeError(f"cannot pickle a merging {type(self).__name__} with protocol {protocol}")
        cls = type(self)  # _merging_class's (mixin, model class)
        return (_new_merging, (vars(cls)["_merged_from"], cls.__bases__[0]), *reduced[2:])


def _restore(model: nn.Module) -> None:
    for module in model.modules():
        original = vars(type(module)).get("_merged_from")
        if original is not None:
            module.__class__ = original
            module.__dict__.pop(STATE, None)


# -- which models, and why not ----------------------------------------------------------------------


def _plan(model: nn.Module) -> list:
    """``[(module, mixin, depth or None, state args or the state)]`` to apply, or a ValueError."""
    if isinstance(model, MaskedImageModeling):
        return [*_plan(model.encoder), (model, _MergingPretraining, None, None)]
    if isinstance(model, CaiT):
        _check_method(model, "forward_features", CaiT)
        for stage in (model.patch_transformer, model.cls_transformer):
            _check_blocks(model, stage, CaiTBlocks, "forward", _check_layerscale_block)
        return [(model.patch_transformer, _MergingCaiTBlocks, len(model.patch_transformer.layers), (False,)),
                (model, _MergingCaiT, None, None)]
    if isinstance(model, (ViT, DeepViT, SimpleViT, EfficientViT)):
        base = next(c for c in (ViT, DeepViT, SimpleViT, EfficientViT) if isinstance(model, c))
        _check_method(model, "forward_features", base)
        runner = model.transformer
        if not isinstance(runner, ResidualBlocks):
            raise ValueError(f"{type(model).__name__}.transformer is {type(runner).__name__}, not fastvit's "
                             f"Transformer: token merging needs fastvit's own blocks (whose attention exposes its "
                             f"keys for the matching)")
        _check_blocks(model, runner, ResidualBlocks, "forward", _check_vit_block)
        num_cls = getattr(model, "num_cls_tokens", 0)
        if num_cls > 1:
            raise ValueError(f"{type(model).__name__} has {num_cls} class tokens; token merging protects one")
        mixin = _MergingVisionModel
        if isinstance(model, DistillTokenMixin):
            _check_method(model, "forward", DistillTokenMixin)
            mixin = _MergingDistillable
        return [(runner, _MergingViTBlocks, len(runner.layers), (num_cls == 1,)), (model, mixin, None, None)]
    timm_plan = _timm_plan(model)
    if timm_plan is not None:
        return timm_plan
    raise ValueError(f"merge_tokens does not support {type(model).__name__}: {_refusal(model)}")


def _unmerged(cls: type) -> type:
    """The model's own class, whether it is merging now or not."""
    return vars(cls).get("_merged_from", cls)


def _refusal(model: nn.Module) -> str:
    """Why an unsupported model is refused, as specifically as we can say it."""
    name = type(model).__name__
    timm_reason = _timm_refusal(model)
    if timm_reason is not None:
        return timm_reason
    if isinstance(model, FeaturesOnly):
        return ("a features_only model returns every block's (or stage's) tokens on the patch grid, which merged "
                "tokens no longer fill; merge the classification model instead")
    module = type(model).__module__
    if module.endswith("ats_vit"):
        return "ATS-ViT already drops tokens by adaptive token sampling, and its blocks run packed token sets"
    if module.endswith("na_vit"):
        return "NaViT runs packed variable-length sequences (fastvit.pack_images); merging is not mapped there"
    if isinstance(model, VisionModel):
        return (f"{name} is not one of the supported models (fastvit's ViT, DistillableViT, DeepViT, SimpleViT, "
                f"CaiT, the pluggable efficient ViT; timm's VisionTransformer family). Hierarchical and windowed "
                f"models pool or window a token grid that merged tokens no longer form")
    return ("supported are fastvit's ViT, DistillableViT, DeepViT, SimpleViT, CaiT and the pluggable efficient "
            "ViT, MAE / SimMIM (their encoder), and timm's VisionTransformer family")


def _check_method(model: nn.Module, name: str, base: type) -> None:
    if getattr(_unmerged(type(model)), name) is not getattr(base, name):
        raise ValueError(f"{type(model).__name__} overrides {base.__name__}.{name}; token merging replaces that "
                         f"computation and cannot know what the override does")


def _check_blocks(model: nn.Module, runner: nn.Module, runner_class: type, method: str, check_block) -> None:
    if getattr(_unmerged(type(runner)), method) is not getattr(runner_class, method):
        raise ValueError(f"{type(model).__name__}'s {type(runner).__name__} overrides {runner_class.__name__}."
                         f"{method}; token merging runs the blocks itself and cannot know what the override does")
    for i, block in enumerate(runner.layers):
        why = check_block(block)
        if why is not None:
            raise ValueError(f"{type(model).__name__}: block {i} {why}")


def _check_vit_block(block) -> Optional[str]:
    attn = block[0]
    if not (isinstance(attn, Attention) and type(attn).forward is Attention.forward):
        return (f"has attention {type(attn).__name__}, not fastvit's Attention (or ReAttention): merging needs "
                f"the attention's keys, computed as Attention computes them")
    return None


def _check_layerscale_block(block) -> Optional[str]:
    attn = block[0]
    if not (isinstance(attn, LayerScale) and isinstance(attn.fn, ContextAttention)
            and type(attn.fn).forward is ContextAttention.forward):
        return f"is not CaiT's LayerScale(TalkingHeadsAttention) block ({type(attn).__name__})"
    return None


# -- attention that also returns its keys (computed once, as the modules compute them) ----------------


def _bias(size: Optional[Tensor], attn: nn.Module):
    """Proportional attention for the keys' ``size (b, nk, 1)`` (None: no merge yet, no bias)."""
    if size is None:
        return None
    mix = attn.head_mix()
    return proportional_attention_bias(size, None if mix is None else mix.pre)


def vit_attention(attn: Attention, x: Tensor, size: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``attn(x)`` (fastvit's ``Attention`` / ``ReAttention``) with proportional attention; also its keys."""
    q, k, v = split_qkv(attn.to_qkv(attn.norm(x)), attn.heads)  # (b, h, n, d) each
    out = attn.attend(q, k, v, scale=attn.scale, bias=_bias(size, attn), head_mix=attn.head_mix())
    return attn.to_out(merge_heads(out)), k


def context_attention(attn: ContextAttention, x: Tensor, size: Optional[Tensor],
                      context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``attn(x, context, kv_include_self=True)`` (CaiT's talking heads) with proportional attention over
    the keys (``size`` of the keys: ``[x; context]`` with a context); also the keys."""
    x = attn.norm(x)
    kv = x if context is None else torch.cat((x, context), dim=1)  # (b, m, dim)
    q = split_heads(attn.to_q(x), attn.heads)  # (b, h, n, d)
    k, v = split_qkv(attn.to_kv(kv), attn.heads, parts=2)  # (b, h, m, d) each
    out = attn.attend(q, k, v, scale=attn.scale, bias=_bias(size, attn), head_mix=attn.head_mix())
    return attn.to_out(merge_heads(out)), k


def _merge_after_attention(x: Tensor, keys: Tensor, size: Optional[Tensor], r: int, class_token: bool,
                           distill_token: bool) -> tuple[Tensor, Optional[Tensor]]:
    matching = bipartite_soft_matching(keys.mean(dim=1), r, class_token=class_token, distill_token=distill_token)
    if matching is None:
        return x, size
    return merge_wavg(matching, x, size)


# -- fastvit: the runners ---------------------------------------------------------------------------


def _vit_block(block: nn.ModuleList, x: Tensor, size: Optional[Tensor], r: int, class_token: bool,
               distill_token: bool):
    """``residual_block`` with merging between the attention and the MLP."""
    attn, ff = block
    out, keys = vit_attention(attn, x, size)
    x = out + x
    x, size = _merge_after_attention(x, keys, size, r, class_token, distill_token)
    return ff(x) + x, size


def _layerscale_block(block: nn.ModuleList, x: Tensor, size: Optional[Tensor], r: int, class_token: bool,
                      distill_token: bool):
    """CaiT's ``layerscale_block`` (self-attention) with merging between the attention and the MLP."""
    attn, ff = block
    out, keys = context_attention(attn.fn, x, size)
    x = out * attn.scale + x
    x, size = _merge_after_attention(x, keys, size, r, class_token, distill_token)
    return ff(x) + x, size


def _class_attention_block(block: nn.ModuleList, x: Tensor, context: Tensor, size: Tensor):
    """CaiT's class-attention block over ``[cls; merged patches]`` with the patches' sizes."""
    attn, ff = block
    out, _ = context_attention(attn.fn, x, size, context=context)
    x = out * attn.scale + x
    return ff(x) + x


def _protect(state: MergeState, distill_token: bool) -> tuple[bool, bool]:
    """(class_token, distill_token) for the matching: a distillation token without a class token comes
    first and is protected as one."""
    if state.class_token:
        return True, distill_token
    return distill_token, False


class _MergingViTBlocks(_Merging):
    """``ResidualBlocks`` whose blocks merge tokens (``MergeState`` in ``_token_merge``)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.merge_forward(x)[0]

    def merge_forward(self, x: Tensor, distill_token: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Tokens ``(b, n, dim)`` -> merged tokens ``(b, n', dim)`` (normed if the runner has a norm) and
        their sizes ``(b, n', 1)`` (None when nothing merged)."""
        state = self.__dict__[STATE]
        class_token, distill = _protect(state, distill_token)
        size = None
        for block, r in zip(self.layers, state.r):
            x, size = self.run_block(_vit_block, block, x, size, r, class_token, distill)
        norm = self._modules.get("norm")
        return (x if norm is None else norm(x)), size


class _MergingCaiTBlocks(_Merging):
    """CaiT's patch ``Transformer`` whose blocks merge tokens (no class token in the patch stage)."""

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if context is not None:
            raise ValueError("a merging CaiT patch stage runs self-attention only (no context)")
        return self.merge_forward(x)[0]

    def merge_forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        state = self.__dict__[STATE]
        pairs = list(zip(self.layers, state.r))
        if self.layer_dropout > 0 and (self.training or self.layer_dropout_in_eval):
            pairs = dropout_layers(pairs, self.layer_dropout)  # the random draws of the original loop
        size = None
        for block, r in pairs:
            x, size = self.run_block(_layerscale_block, block, x, size, r, state.class_token, False)
        return x, size


# -- fastvit: the models ----------------------------------------------------------------------------


class _MergingVisionModel(_Merging):
    """A fastvit model while merging: its runner merges; intermediates are refused."""

    def forward_intermediates(self, *args, **kwargs):
        raise ValueError(f"{type(self).__name__}: {INTERMEDIATES_REFUSED}")


class _MergingDistillable(_MergingVisionModel):
    """``DistillTokenMixin.forward`` with the distillation token after the CLS token (ToMe's layout,
    ``[CLS, DIST, patches]``, so it is protected), instead of last."""

    def forward(self, img: Tensor, distill_token: Optional[Tensor] = None):
        if distill_token is None:
            return super().forward(img)
        x = self.embed(img)  # (b, num_cls + n, dim), positions added
        lead = self.num_cls_tokens
        tokens = distill_token.reshape(1, 1, -1).expand(x.shape[0], -1, -1)  # (b, 1, dim)
        x = torch.cat((x[:, :lead], tokens, x[:, lead:]), dim=1)  # (b, num_cls + 1 + n, dim)
        x, _ = self.transformer.merge_forward(self.dropout(x), distill_token=True)
        distill_out = x[:, lead]
        x = torch.cat((x[:, :lead], x[:, lead + 1:]), dim=1)
        return self.forward_head(x), distill_out


class _MergingCaiT(_MergingVisionModel):
    """CaiT while merging: the patch blocks merge, the class-attention blocks weigh the merged patches
    by their sizes (proportional attention over ``[cls; patches]``)."""

    def forward_features(self, img: Tensor) -> Tensor:
        x, size = self.patch_transformer.merge_forward(self.dropout(self.embed(img)))  # (b, n', dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (b, 1, dim)
        if size is not None:
            size = torch.cat((size.new_ones(size.shape[0], 1, 1), size), dim=1)  # the keys [cls; patches]
        stage = self.cls_transformer
        layers = stage.layers
        if stage.layer_dropout > 0 and (stage.training or stage.layer_dropout_in_eval):
            layers = dropout_layers(stage.layers, stage.layer_dropout)
        for block in layers:
            cls = stage.run_block(_class_attention_block, block, cls, x, size)
        return cls


class _MergingPretraining(_Merging):
    """MAE / SimMIM while their encoder merges: the pre-training loss is refused."""

    def forward(self, *args, **kwargs):
        raise ValueError(f"{type(self).__name__}'s pre-training loss needs one encoded token per patch, and the "
                         f"encoder merges tokens: merging serves the encoder at inference "
                         f"(model.encoder(img)); call fastvit.merge_tokens(model, None) before pre-training")


# -- timm -------------------------------------------------------------------------------------------


def _timm_classes() -> Optional[dict]:
    try:
        import timm  # noqa: F401
    except ImportError:
        return None
    from timm.layers import Attention as TimmAttention
    from timm.models.vision_transformer import Block, VisionTransformer

    from fastvit.compat.timm.vit import Attention as PatchedAttention

    return dict(VisionTransformer=VisionTransformer, Block=Block, attention=(TimmAttention, PatchedAttention))


def _timm_refusal(model: nn.Module) -> Optional[str]:
    """Why a timm model cannot merge (None: not a timm model we know, or it can)."""
    module = type(model).__module__
    if not module.startswith("timm."):
        return None
    if module == "timm.models.beit":
        if getattr(model, "rel_pos_bias", None) is not None or any(
                getattr(getattr(b, "attn", None), "relative_position_bias_table", None) is not None
                for b in getattr(model, "blocks", ())):
            return ("BEiT's relative position bias is indexed by each token's grid position, and a merged token "
                    "stands for several positions (position-dependent biases do not survive merging)")
        return "BEiT blocks are not mapped for token merging (only timm's VisionTransformer family)"
    if module == "timm.models.eva":
        if getattr(model, "rope", None) is not None:
            return ("EVA's rotary position embeddings rotate each token's queries and keys by its grid position, "
                    "and a merged token stands for several positions (position-dependent terms do not survive "
                    "merging)")
        return "EVA blocks are not mapped for token merging (only timm's VisionTransformer family)"
    if module == "timm.models._features":
        return ("a features_only model returns every block's tokens on the patch grid, which merged tokens no "
                "longer fill; merge the classification model instead")
    return (f"timm's {type(model).__name__} is not in the VisionTransformer family (ViT, DeiT, DeiT III, ...) that "
            f"token merging maps")


def _timm_plan(model: nn.Module) -> Optional[list]:
    classes = _timm_classes()
    if classes is None or not isinstance(model, classes["VisionTransformer"]):
        return None
    name = type(model).__name__
    for method in ("forward_features", "_pos_embed"):
        owner = next(k for k in _unmerged(type(model)).__mro__ if method in vars(k))
        if not owner.__module__.startswith("timm.models.") or owner.__name__ not in (
                "VisionTransformer", "VisionTransformerDistilled"):
            raise ValueError(f"{name} overrides VisionTransformer.{method} ({owner.__qualname__}); token merging "
                             f"replaces that computation and cannot know what the override does")
    if getattr(model, "reg_token", None) is not None:
        raise ValueError(f"{name} has {model.reg_token.shape[1]} register tokens: token merging protects only a "
                         f"class and a distillation token, and would merge the registers into patches")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"{name} pools with attention (global_pool='map'), which would weigh a merged token as "
                         f"one patch; token merging maps class-token and average pooling")
    for i, block in enumerate(model.blocks):
        if type(block) is not classes["Block"]:
            raise ValueError(f"{name}: block {i} is {type(block).__name__}; token merging maps timm's pre-norm "
                             f"Block only")
        if type(block.attn) not in classes["attention"]:
            raise ValueError(f"{name}: block {i}'s attention is {type(block.attn).__name__}; token merging maps "
                             f"timm.layers.Attention (patched by fastvit.patch_timm or not)")
    state = (getattr(model, "cls_token", None) is not None, getattr(model, "dist_token", None) is not None)
    return [(model, _MergingTimmViT, len(model.blocks), state)]


def timm_attention(attn: nn.Module, x: Tensor, size: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """timm's ``Attention(x)`` through ``attend()`` with proportional attention; also its keys."""
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = split_qkv(attn.qkv(x), attn.num_heads)  # (b, h, n, d) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attend(q, k, v, scale=attn.scale, bias=None if size is None else proportional_attention_bias(size),
                 dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(merge_heads(out))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k


def _timm_block(block: nn.Module, x: Tensor, size: Optional[Tensor], r: int, class_token: bool,
                distill_token: bool):
    """timm's ``Block.forward`` with merging between the attention and the MLP (ToMe's ``ToMeBlock``)."""
    out, keys = timm_attention(block.attn, block.norm1(x), size)
    x = x + block.drop_path1(block.ls1(out))
    x, size = _merge_after_attention(x, keys, size, r, class_token, distill_token)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size


class _MergingTimmViT(_Merging):
    """timm's ``VisionTransformer`` while merging: ``forward_features`` runs the blocks with merging."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("an attn_mask or is_causal addresses tokens by position, which merged tokens no "
                             "longer have: call fastvit.merge_tokens(model, None) to use them")
        state = self.__dict__[STATE]
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = None
        for block, r in zip(self.blocks, state.r):
            args = (block, x, size, r, state.class_token, state.distill_token)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, size = torch_checkpoint.checkpoint(_timm_block, *args, use_reentrant=False)
            else:
                x, size = _timm_block(*args)
        return self.norm(x)

    def forward_intermediates(self, *args, **kwargs):
        raise ValueError(f"{type(self).__name__}: {INTERMEDIATES_REFUSED}")
