"""`hafa bench`: each HAFA model beside its baseline, measured in one process.

Figures: parameters; MACs (tools.flops.count_macs: clustering, bilinear sampling and merging by
formula); the aten operators that launch a kernel in one forward at the small batch (what bounds a
GPU's latency there); inference latency at a small batch; forward time (and throughput) at a large
batch; one training step at the large batch (forward, cross-entropy, backward, AdamW step); peak memory
of that forward and of that step (timing).

`hafa bench --modules`: LAA and SIA against the plain downsampling they replace, and where a HAFA
backbone's forward time goes at the detection size (modules).

`hafa bench --cost`: kernel launches, bytes and FLOPs of a forward and a training step on a GPU's code
path, counted on this machine with fake CUDA tensors (cost).

The tables, ratios and goals are in report; the options in command.
"""

from .command import add_arguments, run
from .report import TARGET_PAIRS
from .timing import Timing, count_operators, interleaved_timings, peak_memory_mb

__all__ = ["add_arguments", "run", "TARGET_PAIRS", "Timing", "count_operators", "interleaved_timings", "peak_memory_mb"]
