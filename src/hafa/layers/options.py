"""`HafaOptions`: HAFA's choices for one model, checked once, in one frozen object.

options = HafaOptions(cluster_ratio=0.5)                  # or HafaOptions.of({"knn_k": 3}, where="recipe")
hafa.convert(model, options)                              # or hafa.convert(model, cluster_ratio=0.5)
"""

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..spec import Choice, Flag, Number, Setting, SettingError, Values, Whole

AGGREGATIONS = ("conv", "laa", "sia")
# The paper's transitions 1->2, 2->3, 3->4; a family whose last stage does not attend takes LAA there.
HAFA_AGGREGATION = ("laa", "laa", "sia")
BASELINE_AGGREGATION = ("conv", "conv", "conv")
# "batch": BatchNorm2d and GELU after the deformable conv, as in the authors' code (the paper's network).
# "baseline": the baseline downsampling's own norm, so that an LAA with zero offsets is that layer exactly.
LAA_NORMS = ("batch", "baseline")


@dataclass(frozen=True)
class HafaOptions:
    """stage_aggregation: 'conv', 'laa' or 'sia' for the transitions 1->2, 2->3, 3->4 (None: the
    family's default, the paper's LAA, LAA, SIA where the last stage attends); cluster_ratio: SIA's
    clusters per token; knn_k: DPC-KNN's neighbours; cluster_qkv: SIA clusters keys and values too
    (paper Table 5); laa_norm: LAA's norm, "batch" (the paper's) or "baseline" (the transition's own)."""

    SETTINGS: ClassVar[dict[str, Setting]] = dict(
        stage_aggregation=Values(item=Choice(choices=AGGREGATIONS), length=3, note="transitions 1->2, 2->3, 3->4"),
        cluster_ratio=Number(0.25, low=0, low_open=True, high=1, note="clusters per token"),
        knn_k=Whole(5, low=1, note="neighbours for the density"),
        cluster_qkv=Flag(False),
        laa_norm=Choice("batch", choices=LAA_NORMS),
    )

    stage_aggregation: tuple[str, str, str] | None = None
    cluster_ratio: float = SETTINGS["cluster_ratio"].default
    knn_k: int = SETTINGS["knn_k"].default
    cluster_qkv: bool = SETTINGS["cluster_qkv"].default
    laa_norm: str = SETTINGS["laa_norm"].default

    def __post_init__(self):
        self._check("")

    def _check(self, where: str) -> None:
        for name, setting in self.SETTINGS.items():
            value = getattr(self, name)
            if value is not None or name != "stage_aggregation":  # None: the family's default
                value = setting.check(value, f"{where}{name}")
            object.__setattr__(self, name, tuple(value) if isinstance(value, list) else value)

    @classmethod
    def of(cls, options: "HafaOptions | Mapping[str, Any] | None" = None, where: str = "", **keywords) -> "HafaOptions":
        """HafaOptions from options (an object, a mapping such as a recipe's, or None) with `keywords`
        over them; where: what the messages name (e.g. 'best.pth: model.args'). SettingError (a
        ValueError) naming the option and its value for an unknown option or a value out of range."""
        base = dataclasses.asdict(options) if isinstance(options, HafaOptions) else dict(options or {})
        chosen = {**base, **keywords}
        prefix = f"{where}: " if where else ""
        unknown = sorted(set(chosen) - set(cls.SETTINGS), key=str)
        if unknown:
            raise SettingError(f"{prefix}unknown HAFA option {unknown[0]!r} (known: {', '.join(cls.SETTINGS)})")
        options = cls.__new__(cls)
        for name in cls.SETTINGS:
            object.__setattr__(options, name, chosen.get(name, cls.SETTINGS[name].default))
        options._check(f"{where}." if where else "")
        return options

    def num_clusters(self, num_tokens: int) -> int:
        """SIA's clusters for `num_tokens` tokens: ceil(cluster_ratio * num_tokens), at least one."""
        return max(1, math.ceil(self.cluster_ratio * num_tokens))

    def replace(self, **changes) -> "HafaOptions":
        return self.of(self, **changes)

    def keywords(self) -> dict[str, Any]:
        """The options as keyword arguments a checkpoint records (stage_aggregation a list; left out
        while it is the family's default, None)."""
        values = {name: getattr(self, name) for name in self.SETTINGS}
        if self.stage_aggregation is None:
            del values["stage_aggregation"]
        else:
            values["stage_aggregation"] = list(self.stage_aggregation)
        return values
