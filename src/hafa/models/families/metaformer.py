"""MetaFormer (timm's MetaFormer: caformer, convformer, poolformerv2, poolformer v1) as a HAFA family.

Transitions `stages.{1,2,3}.downsample`: Downsampling, a channel norm (none in poolformer v1) before a
3x3/s2/p1 conv `conv`, NCHW in and out; its LAA form replaces only the conv (hafa.layers.
DeformableConv2d, keeping the conv's names), the norm before it stays. Stages take and give NCHW
maps (attention stages turn them into tokens inside), so the Family defaults run them. SIA projects
with the whole Downsampling, map to map, and normalises the merged tokens with a LayerNorm of its own
(no norm of the model sits there: the Downsampling's norm is on its input). Only attention stages
(caformer's last two) can start with SIA; after it each block keeps its layers: the fused qkv as q and
kv (views of its weight), MetaFormer's scale, the linear MLP, layer and residual scales (vectors that
broadcast over B x N x C tokens in attention stages). The head (pool, LayerNorm2d, fc) runs on the
merged tokens as on a B x C x N x 1 map.
"""

import timm
import torch
from timm.models import metaformer
from torch import Tensor, nn

from ...layers import SIA, Block, DeformableConv2d, HafaOptions
from ..family import ClusteredStage, Family, fused_qkv_attention


def clustered_block(block: metaformer.MetaFormerBlock) -> Block:
    """A MetaFormer attention block running on merged tokens, with the block's own layers."""
    return Block(
        norm1=block.norm1,
        attn=fused_qkv_attention(block.token_mixer),
        norm2=block.norm2,
        mlp=block.mlp,
        drop_path1=block.drop_path1,
        drop_path2=block.drop_path2,
        layer_scale1=block.layer_scale1,
        layer_scale2=block.layer_scale2,
        res_scale1=block.res_scale1,
        res_scale2=block.res_scale2,
    )


def downsampling(model: nn.Module, index: int) -> metaformer.Downsampling:
    """Stage `index`'s Downsampling; timm leaves it out (nn.Identity) where the stage keeps the width."""
    transition = model.stages[index].downsample
    if not isinstance(transition, metaformer.Downsampling):
        width = model.feature_info[index]["num_chs"]
        raise ValueError(
            f"metaformer's stage {index + 1} has no downsampling (stages.{index}.downsample is "
            f"{type(transition).__name__}: timm builds none where a stage keeps the width, here {width}), so "
            "there is no transition for LAA or SIA to replace; keep it 'conv'"
        )
    return transition


class MetaFormerFamily(Family):
    name = "metaformer"
    model_classes = (metaformer.MetaFormer,)
    model_names = tuple(timm.list_models(module="metaformer"))

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.stem(images)

    token_pools = None  # the head's own pooling layer pools the tokens, whatever its pool type

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        head = model.head
        # the tokens as a B x C x N x 1 map: the head's pooling and channel norm treat them as positions
        x = head.norm(head.global_pool(tokens.transpose(1, 2).unsqueeze(-1)))
        x = head.flatten(x) if head.global_pool.pool_type else x.squeeze(-1).transpose(1, 2)
        x = head.drop(x)
        return x if pre_logits else head.fc(x)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {index for index, stage in enumerate(model.stages) if not stage.use_nchw}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        transition = downsampling(model, index)
        transition.conv = DeformableConv2d.from_conv(transition.conv, laa_norm)

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        stage = model.stages[index]
        transition = downsampling(model, index)
        conv = transition.conv
        with torch.device(conv.weight.device):
            sia = SIA(in_dim=conv.in_channels, out_dim=conv.out_channels, proj=transition, options=options)
        blocks = nn.ModuleList(clustered_block(block) for block in stage.blocks)
        model.stages[index] = ClusteredStage(sia=sia, blocks=blocks)

    def checkpoint_names(self, state_dict: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """A block's `token_mixer` is `attn` in the blocks after SIA (hafa.layers.Block's name)."""
        clustered_blocks = {name.partition(".attn.")[0] for name in targets if ".attn." in name}
        renamed = {}
        for name, tensor in state_dict.items():
            block, mixer, inside = name.partition(".token_mixer.")
            renamed[f"{block}.attn.{inside}" if mixer and block in clustered_blocks else name] = tensor
        return renamed


FAMILY = MetaFormerFamily()
