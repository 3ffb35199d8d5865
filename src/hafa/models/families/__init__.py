"""The families hafa.convert takes, one self-contained module each (docs/plugin.md walks through one).

Each module defines FAMILY, an instance of its hafa.models.family.Family subclass; FAMILIES holds them in
the order a model's family is looked up and listed. hafa.models.registry registers every name in a
family's `model_names` as hafa_<name>."""

from . import (
    convnext,
    davit,
    edgenext,
    focalnet,
    gcvit,
    inception_next,
    mambaout,
    metaformer,
    mvitv2,
    pvt,
    pvt_v2,
    swin,
    swinv2,
    tiny_vit,
    twins,
)

FAMILIES = (
    pvt_v2.FAMILY,
    swin.FAMILY,
    swinv2.FAMILY,
    twins.FAMILY,
    pvt.FAMILY,
    metaformer.FAMILY,
    convnext.FAMILY,
    inception_next.FAMILY,
    mambaout.FAMILY,
    focalnet.FAMILY,
    edgenext.FAMILY,
    davit.FAMILY,
    tiny_vit.FAMILY,
    gcvit.FAMILY,
    mvitv2.FAMILY,
)

__all__ = ["FAMILIES"]
