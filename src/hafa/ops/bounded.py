"""Tokens whose squared distances cannot overflow: what DPC-KNN's two paths (PyTorch and the Triton op)
cluster, so that NaN, infinite and huge tokens give them both one defined partition."""

import math

import torch
from torch import Tensor


def distance_bound(dtype: torch.dtype, k: int, channels: int) -> float:
    """The largest token magnitude at which no sum of k squared distances overflows `dtype`: a squared
    distance of tokens within [-b, b]^C is at most 4 C b^2, k of them 4 k C b^2 (halved for rounding)."""
    return 0.5 * math.sqrt(torch.finfo(dtype).max / (4 * k * channels))


def bounded_tokens(x: Tensor, k: int) -> Tensor:
    """x (B x N x C, floating) with NaN as 0 and +-infinity as +- the bound, and an image whose largest
    magnitude exceeds the bound scaled down to it (distance_bound for x's dtype and k neighbours). Every
    value is kept bit for bit where nothing exceeds the bound, which is the case for any token a model
    normalises before clustering. Fixed shapes, no host-device synchronisation: it costs a few
    elementwise passes over B x N x C, never a check the host would wait for."""
    bound = distance_bound(x.dtype, k, x.shape[-1])
    x = torch.nan_to_num(x, nan=0.0, posinf=bound, neginf=-bound)
    peak = torch.linalg.vector_norm(x, ord=math.inf, dim=(1, 2), keepdim=True)
    return x.mul_((bound / peak).clamp_(max=1.0))
