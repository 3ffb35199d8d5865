"""Multiply-accumulate counts (MACs; the 'GFLOPs' of vision papers) with torch.utils.flop_counter.

FlopCounterMode sees matmuls and convolutions. It counts nothing for CPU scaled-dot-product
attention, bilinear sampling (LAA), top-k and sort (DPC-KNN) and scatters (merging, the
dictionary), so those get formulas here: attention as its two matmuls, 4 MACs per bilinear sample
and channel, and one per element for top-k, sort comparisons and scatter adds. For backward passes
(the cost model's training step): bilinear sampling's gradients, and the convolution's with groups
(flop_counter's formula multiplies a grouped convolution's weight gradient by the number of groups).
"""

import math

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(shape)


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _grid_sample(input, grid, *args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * _numel(out_shape)


def _topk(input, k, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input)


def _sort(input, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input) * max(1, math.ceil(math.log2(max(input[-1], 2))))


def _scatter(input, dim, index, src, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(index)


def _grid_sample_backward(
    grad_output, input, grid, interpolation_mode, padding_mode, align_corners, output_mask, **kwargs
) -> int:
    """4 multiply-adds per sample and channel for the input's gradient, 8 for the grid's (x and y)."""
    return 2 * 4 * _numel(grad_output) * (int(output_mask[0]) + 2 * int(output_mask[1]))


def _conv_backward(
    grad_out, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, output_mask, **kwargs
) -> int:
    """Each gradient asked for (input, weight) takes the forward's multiply-adds."""
    forward = 2 * _numel(x if transposed else grad_out) * _numel(weight[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


CUSTOM_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten.grid_sampler_2d: _grid_sample,
    aten.topk: _topk,
    aten.sort: _sort,
    aten.scatter_add: _scatter,
    aten.scatter_reduce: _scatter,
    aten.grid_sampler_2d_backward: _grid_sample_backward,
    aten.convolution_backward: _conv_backward,
}


@torch.no_grad()
def count_macs(model: torch.nn.Module, input_size: tuple[int, int, int, int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass in eval mode (FLOPs / 2)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        model(torch.randn(input_size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return counter.get_total_flops() // 2
