"""`hafa.convert`: a hierarchical timm model (or our PVT v1) in its HAFA form, as a new module.

The HAFA model adopts the model's own layers under their own names (a timm checkpoint's keys stay
valid), replaces the chosen transitions by their LAA form (the transition's own strided conv, read at
learned offsets that start at zero) or by SIA (projecting with the family's own downsampling), and
rebuilds the blocks of each stage that starts with SIA to run on merged tokens. What a family looks
like is said by its adapter, a `Family` (hafa.models.family; one module each in hafa.models.families):
where its transitions are, the format its stages take, and how its blocks run on clustered tokens.
Grid stages run the model's own stage code, so a conversion with laa_norm="baseline" and no SIA
computes the model exactly.
"""

import copy
from collections.abc import Sequence
from typing import Any

import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, feature_take_indices
from torch import Tensor, nn

from ..checkpoint import LoadReport
from ..layers import HafaOptions
from ..ops import TokenLayout
from .common import check_images, keep_sizes_static
from .families import FAMILIES
from .family import Family

# timm's features_only wrappers: they hold the model's stages, not the model.
FEATURE_WRAPPERS = (FeatureDictNet, FeatureGetterNet, FeatureHookNet)


def check_convertible(model: Any) -> None:
    """A ValueError unless `model` is a model hafa.convert can take (a module, not yet converted, not a
    features_only wrapper); its family is checked by HafaModel."""
    if isinstance(model, str):
        raise ValueError(
            f"hafa.convert takes a model, not a model's name: pass the model, e.g. "
            f"hafa.convert(timm.create_model({model!r}))"
        )
    if not isinstance(model, nn.Module):
        raise ValueError(
            "hafa.convert: model must be a timm model (an nn.Module, e.g. timm.create_model('pvt_v2_b0')), "
            f"got {type(model).__name__}"
        )
    if isinstance(model, HafaModel):
        raise ValueError(
            f"hafa.convert: the model is already a HAFA model (converted from {model.base_class.__name__}, "
            f"stage_aggregation {list(model.stage_aggregation)}); use it as it is, or convert the original "
            "timm model with other options"
        )
    if isinstance(model, FEATURE_WRAPPERS):
        raise ValueError(
            f"hafa.convert takes a whole model, not timm's features_only wrapper ({type(model).__name__}): "
            "convert the model first and take its maps with forward_intermediates, or create the HAFA model "
            "with features_only=True (timm.create_model('hafa_<name>', features_only=True))"
        )


def keep_modes(root: nn.Module, before: dict[int, tuple[nn.Module, bool]]) -> None:
    """Every module below root that was in `before` (id -> (the module, its training mode)) back in its
    mode; a new one in the mode of the nearest module above it that was there before (root's mode at
    the top)."""

    def settle(module: nn.Module, inherited: bool) -> None:
        kept = before.get(id(module))
        mode = kept[1] if kept is not None and kept[0] is module else inherited
        module.training = mode
        for child in module.children():
            settle(child, mode)

    for child in root.children():
        settle(child, root.training)


def family_of(model: nn.Module) -> Family | None:
    """The family of `model`: a HAFA model's own, else the family whose model classes take it (None if
    none does)."""
    if isinstance(model, HafaModel):
        return model.family
    return next((family for family in FAMILIES if isinstance(model, family.model_classes)), None)


def check_stage_aggregation(family: Family, model: nn.Module, options: HafaOptions) -> tuple[str, str, str]:
    """The transitions of `model` with `options`: theirs, else the family's default, "sia" only into a
    stage whose blocks attend."""
    choice = options.stage_aggregation or family.default_stage_aggregation(model)
    attending = family.attention_stages(model)
    for index, kind in enumerate(choice, start=1):
        if kind == "sia" and index not in attending:
            raise ValueError(
                f"stage_aggregation {list(choice)}: SIA merges tokens for the attention of the stage after it, and "
                f"{family.name}'s stage {index + 1} has no attention (its stages with attention: "
                f"{', '.join(str(i + 1) for i in sorted(attending)) or 'none'}); use 'laa' or 'conv' there"
            )
    return choice


class HafaModel(nn.Module):
    """A model of one family whose stage transitions are 'conv' (the model's own), 'laa' or 'sia'.

    It keeps the timm interface of the model it was made from: forward_features / forward_head,
    forward_intermediates (NCHW maps at strides 4 to 32; after SIA painted through the dictionary),
    prune_intermediate_layers, reset_classifier, set_grad_checkpointing, features_only (timm's getter
    wrapper). forward_features returns what the model's returns when its last stage is a grid, else the
    final merged tokens B x N x C (normalised), which forward_head pools as the model's head pools the
    positions of a map (its global_pool: 'avg', 'max', ...; '' gives a prediction per token).
    """

    def __init__(self, *, model: nn.Module, options: HafaOptions = HafaOptions()):
        """model: the model to convert (its layers are taken over, not copied: see `convert`). Every layer
        keeps its training mode; a new one (LAA's offsets, SIA) takes the mode of the part it sits in.
        self.options: `options` with the transitions chosen (the family's default where they were None)."""
        check_convertible(model)
        if not isinstance(options, HafaOptions):
            raise ValueError(f"HafaModel: options must be a hafa.HafaOptions, got {type(options).__name__}")
        super().__init__()
        family = family_of(model)
        if family is None:
            names = ", ".join(f.name for f in FAMILIES)
            raise ValueError(
                f"hafa.convert takes models of these families: {names}; {type(model).__name__} is none of them"
            )
        modes = {id(module): (module, module.training) for module in model.modules()}
        self.options = options.replace(stage_aggregation=check_stage_aggregation(family, model, options))
        self.family = family
        self.base_class = type(model)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        for name, value in vars(model).items():  # num_classes, global_pool, feature_info, ...
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.in_chans = next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))
        self.output_fmt = "NCHW"  # forward_intermediates' maps, whatever format the family's stages use
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        family.prepare(self, self.stage_aggregation)
        for index, kind in enumerate(self.stage_aggregation, start=1):
            if kind == "laa":
                family.convert_laa(self, index, self.options.laa_norm)
            elif kind == "sia":
                family.convert_sia(self, index, self.options)
        if self._clustered(self._num_stages() - 1):
            family.check_token_pool(getattr(self, "global_pool", ""))
        if len(dtypes) == 1:  # the new layers (offsets, BatchNorms, SIA's) in the model's precision
            self.to(dtype=dtypes.pop())
        self.training = model.training
        keep_modes(self, modes)

    @property
    def stage_aggregation(self) -> tuple[str, str, str]:
        return self.options.stage_aggregation

    def _clustered(self, index: int) -> bool:
        """Whether stage `index` starts with SIA."""
        return index > 0 and self.stage_aggregation[index - 1] == "sia"

    def _num_stages(self) -> int:
        return len(self.feature_info)

    def _stages(self, images: Tensor, last: int, padding_mask: Tensor | None, take: Sequence[int], norm: bool):
        """Stages 0..last: -> (the last stage's output, its layout (None for a grid), the maps of `take`)."""
        family = self.family
        x, layout, maps = family.stem(self, images), None, []
        for index in range(last + 1):
            if self._clustered(index):
                if layout is None:
                    x, layout = family.tokens_of(self, index, x)
                x, layout = family.run_clustered_stage(self, index, x, layout, padding_mask)
            else:
                if layout is not None:
                    x, layout = family.from_nchw(self, index, layout.to_map(x)), None
                x = family.run_stage(self, index, x)
            if index in take:
                final = norm and index == self._num_stages() - 1
                if layout is not None:
                    maps.append(layout.to_map(family.token_features(self, x) if final else x))
                else:
                    maps.append(family.to_nchw(self, index, family.grid_features(self, x) if final else x))
        return x, layout, maps

    def forward_features(self, x: Tensor) -> Tensor:
        check_images(x, self.in_chans)
        x, layout, _ = self._stages(x, self._num_stages() - 1, None, (), False)
        return self._final_features(x, layout)

    def _final_features(self, x: Any, layout: TokenLayout | None) -> Tensor:
        """forward_features' result from the last stage's output (and its layout, None for a grid)."""
        family = self.family
        return (
            family.grid_output(self, family.grid_features(self, x))
            if layout is None
            else family.token_features(self, x)
        )

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self._clustered(self._num_stages() - 1):
            return self.family.token_head(self, x, pre_logits)
        return self.base_class.forward_head(self, x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        padding_mask: Tensor | None = None,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage feature maps (strides 4, 8, 16, 32), B x C x H x W each; after SIA painted through the
        dictionary. Returns the maps, or (the final features, as forward_features, and the maps).

        padding_mask: B x H x W bool, True where x is padding (detection batches pad images to a common
        size): tokens wholly in the padding never become SIA's cluster centres."""
        if output_fmt != "NCHW":
            raise ValueError("HAFA models return NCHW feature maps")
        check_images(x, self.in_chans)
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool or padding_mask.shape != (x.shape[0], *x.shape[2:]):
                raise ValueError(
                    f"padding_mask must be bool B x H x W as the images {tuple(x.shape)}, got {padding_mask.dtype} "
                    f"{tuple(padding_mask.shape)}"
                )
            keep_sizes_static(padding_mask)
        num_stages = self._num_stages()
        take, max_index = feature_take_indices(num_stages, indices)
        last = max_index if stop_early or intermediates_only else num_stages - 1
        x, layout, maps = self._stages(x, last, padding_mask, take, norm)
        if intermediates_only:
            return maps
        if last == num_stages - 1:
            x = self._final_features(x, layout)
        return x, maps

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(self._num_stages(), indices)
        prune_end = max_index < self._num_stages() - 1
        self.family.prune(self, max_index)
        if (prune_norm or prune_end) and self.family.final_norm_name is not None:
            setattr(self, self.family.final_norm_name, nn.Identity())  # it fits the last stage only
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.family.drop_head(self)
        return take

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.base_class.set_grad_checkpointing(self, enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.base_class.get_classifier(self)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and self._clustered(self._num_stages() - 1):
            self.family.check_token_pool(global_pool)
        self.base_class.reset_classifier(self, num_classes, global_pool)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        method = getattr(self.base_class, "no_weight_decay", None)
        return method(self) if method is not None else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return self.base_class.group_matcher(self, coarse)


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def sia_stages(stage_aggregation: Sequence[str]) -> list[int]:
    """The stages (1-3) that start with SIA."""
    return [transition + 1 for transition, kind in enumerate(stage_aggregation) if kind == "sia"]


def conversion_report(before: dict[str, Tensor], converted: HafaModel) -> LoadReport:
    """What a conversion kept (tensors of the model, possibly under new names, e.g. a fused qkv as q and
    kv), made new (LAA's offsets and BatchNorm, SIA's own layers) and left out (e.g. Swin's relative
    position biases after SIA), from the model's state dict `before` and the converted model."""
    kept = {_storage(t) for t in before.values()}
    after = converted.state_dict()
    used = {_storage(t) for t in after.values()}
    laa_norm = converted.options.laa_norm if "laa" in converted.stage_aggregation else None
    return LoadReport(
        copied=[name for name, t in after.items() if _storage(t) in kept],
        newly_initialised=[name for name, t in after.items() if _storage(t) not in kept],
        unused=[name for name, t in before.items() if _storage(t) not in used],
        laa_norm=laa_norm,
        # a family whose transition has BatchNorm after its conv keeps it in both modes (TinyViT)
        laa_batch_norms_new=laa_norm == "batch"
        and any(_storage(t) not in kept and name.endswith(".running_mean") for name, t in after.items()),
        sia_stages=sia_stages(converted.stage_aggregation),
        source="the model it was converted from",
    )


def convert(model: nn.Module, options: HafaOptions | None = None, **keywords) -> HafaModel:
    """The HAFA form of `model` (of a family in hafa.models.FAMILIES: timm's pvt_v2, swin, swinv2, twins,
    caformer / convformer / poolformerv2, convnext, ... or our PVT v1), a new module that keeps every weight
    `model` has: LAA takes each chosen transition's own strided conv (its offsets start at zero;
    laa_norm="baseline" keeps the transition's own norm, so that with no SIA the model computes `model`
    exactly before training), SIA projects with the family's own downsampling. `model` itself is left as
    it was (the new module holds copies of its layers). What was kept, made new and left out is the
    result's `conversion_report` (a hafa.LoadReport, as hafa.load_pretrained returns). Each layer keeps
    its training mode (a head in eval mode stays so); the new layers take the mode of the part they sit
    in.

    options: a hafa.HafaOptions; keywords: its fields (stage_aggregation, cluster_ratio, knn_k,
    cluster_qkv, laa_norm) over it. The transitions default to the family's: LAA, LAA, SIA where the
    last stage attends, else LAA three times."""
    check_convertible(model)
    options = HafaOptions.of(options, **keywords)
    copied = copy.deepcopy(model)
    before = copied.state_dict()
    converted = HafaModel(model=copied, options=options)
    converted.conversion_report = conversion_report(before, converted)
    return converted
