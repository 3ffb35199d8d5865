"""torch.compile for the task commands: one static graph per input size, and a bounded number of them.

Why static: under dynamic shapes the dictionary's size arithmetic (pooling taps, ceil and floor
divisions of H and W) grows into symbolic expressions that dynamo spends minutes simplifying, where a
graph for one size compiles in about the first graph's time. So every HAFA model keeps its images'
height and width static while it is compiled (hafa.models check_images), and the commands compile with
dynamic=False. A new input (size, batch, training or evaluation, autocast) is a new graph, logged in one
line; past `max_variants` graphs new inputs run eagerly, said once. docs/compile.md has the measurements.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_logger = logging.getLogger("hafa")

# Graphs one compiled network keeps: train and eval at a few sizes (detection pads to size buckets,
# hafa.models.mask_rcnn.side_buckets), and the smaller last batch of an evaluation.
MAX_VARIANTS = 16
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "aot_eager")

_compile_window = False  # a new graph began compiling and the step it serves has not finished


def compiling() -> bool:
    """Whether a graph began compiling since the last `close_compile_window()`: a stop asked for now
    cannot wait for the step to end (the commands' signal handler stops at once then)."""
    return _compile_window


def close_compile_window() -> None:
    """The step that may have compiled has finished its forward and backward passes."""
    global _compile_window
    _compile_window = False


def _describe(value: Any) -> Any:
    """What a graph is specialised on in an argument: the shape, dtype and device of each tensor."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _describe(v)) for k, v in value.items())
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__


def _shapes(args: tuple) -> str:
    return ", ".join(" x ".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor))


class SizedCompile:
    """A module's call through torch.compile, one graph per input (tensor shapes, training or evaluation,
    gradient and autocast modes), at most `max_variants` graphs; later inputs run eagerly.

    compile_seconds: the time of each new graph's first call (its forward compile; a training graph's
    backward compiles in its first backward pass)."""

    def __init__(self, module: nn.Module, compiled: Callable, name: str, max_variants: int):
        self.module, self.compiled, self.name, self.max_variants = module, compiled, name, max_variants
        self.variants: set = set()
        self.compile_seconds: list[float] = []
        self._said_eager = False

    def __call__(self, *args, **kwargs):
        global _compile_window
        autocast = torch.is_autocast_enabled(args[0].device.type) if args and torch.is_tensor(args[0]) else False
        key = (_describe(args), _describe(kwargs), self.module.training, torch.is_grad_enabled(), autocast)
        if key in self.variants:
            return self.compiled(*args, **kwargs)
        if len(self.variants) >= self.max_variants:
            if not self._said_eager:
                _logger.warning(
                    "%s: %d compiled graphs kept; inputs of new sizes run eagerly from now on",
                    self.name,
                    self.max_variants,
                )
                self._said_eager = True
            return self.module._call_impl(*args, **kwargs)
        self.variants.add(key)
        _logger.info(
            "%s: compiling for input %s (%s; graph %d of at most %d)",
            self.name,
            _shapes(args),
            "training" if self.module.training else "evaluation",
            len(self.variants),
            self.max_variants,
        )
        _compile_window = True
        start = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        self.compile_seconds.append(time.perf_counter() - start)
        return out


def compile_network(
    module: nn.Module, mode: str | None, *, name: str, fullgraph: bool = True, max_variants: int = MAX_VARIANTS
) -> SizedCompile | None:
    """torch.compile `module` in place (its state dict keeps its names, so checkpoints are the eager
    module's), static shapes, one graph per input up to `max_variants`. mode: one of inductor's modes
    ("default", "reduce-overhead", "max-autotune"), "aot_eager" (traced and run without generating code),
    or None (eager: nothing is done). -> the dispatcher, which counts the graphs and their compile times."""
    if mode is None:
        return None
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    # dynamo's own bound must not stop earlier than ours (it would run new inputs eagerly unannounced)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, max_variants + 1)
    backend = dict(backend="aot_eager") if mode == "aot_eager" else dict(mode=mode)
    module.compile(fullgraph=fullgraph, dynamic=False, **backend)
    sized = SizedCompile(module, module._compiled_call_impl, name, max_variants)
    module._compiled_call_impl = sized
    return sized
