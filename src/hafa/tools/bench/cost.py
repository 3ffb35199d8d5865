"""`hafa bench --cost`: a cost model that runs on a CPU. Kernel launches, bytes read and written, and FLOPs
of HAFA models and their baselines on a GPU's code path, counted with fake CUDA tensors (shapes and
dtypes only: nothing is computed, no GPU is needed, nothing is timed).

- launch: an operator that launches a kernel (timing.launches_kernel: not a view, an allocation or a
  metadata query), counted after composite operators are decomposed into what they run; a custom op of
  the namespace hafa (a Triton kernel) is one launch. Operators that build a kept constant
  (ops.constants.shape_constant: fake tensors keep none, a GPU builds each once) are counted apart.
- bytes: for each launch, the bytes of its tensor inputs plus those of its tensor outputs, a broadcast
  dimension (stride 0) counted once: what the kernel reads and writes when nothing stays in a cache.
- FLOPs: torch.utils.flop_counter's formulas (matmuls, convolutions, attention), tools.flops' (bilinear
  sampling, top-k, sort, scatter) and HAFA_OP_FLOPS for the hafa ops; other operators count none.
- parts: an operator belongs to the part of the innermost Python frame on its call stack whose code is
  one of PART_SOURCES (source locations, not module classes), else to "rest". A backward operator
  belongs to the part of the forward call that made its autograd node (node.metadata[PART_KEY]).
- passes: "forward", eval mode under torch.inference_mode; "train", train mode: forward, cross-entropy
  and the backward pass (the optimizer step is left out).

On fake CUDA tensors the code takes the GPU's path (DPC-KNN scans every token, the Triton kernels run
their fake implementations under use_kernels("triton")); attention is answered as a GPU would choose it
for float32: memory-efficient attention (fake tensors' own answer would be the math path, many kernels).
The autograd engine cannot run on fake CUDA tensors without a GPU (it wants a CUDA context), so
run_backward replays what it does, node by node.
"""

import importlib
import inspect
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from types import CodeType, FrameType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, shape_wrapper

from ...models.table import BASELINE
from ...ops import use_kernels
from ...tasks.networks import sized_model
from ..flops import CUSTOM_FLOPS
from .report import ratio
from .timing import OperatorCounter

aten = torch.ops.aten

# Where each part's operators are called from: modules (all their code), classes (the code of their
# methods) or functions, by dotted name. Resolved when counting starts: a name that no longer exists
# (code moved) is an error, not a silently empty part.
PART_SOURCES = {
    "laa": ("hafa.layers.laa.LAA", "hafa.layers.laa.LAAPatchMerging", "hafa.layers.laa.DeformableConv2d"),
    "clustering": ("hafa.ops.clustering",),
    "merging": ("hafa.ops.merge",),
    "dictionary": ("hafa.ops.token_map",),
    "sia": ("hafa.layers.sia",),
}
PARTS = (*PART_SOURCES, "rest")
# Code that builds a tensor kept between forwards; an operator with it anywhere on its stack is "kept".
KEPT_SOURCES = ("hafa.ops.constants.shape_constant",)
KEPT = "kept"
KERNELS = ("torch", "triton")
PART_KEY = "hafa.part"


def _sampling_flops(*args, out_shape=None, **kwargs) -> int:
    """hafa::laa_columns: 4 multiply-adds per sample and channel, as tools.flops counts grid_sample."""
    return 2 * 4 * math.prod(out_shape)


def _sampling_backward_flops(grad_columns, *args, out_shape=None, **kwargs) -> int:
    """hafa::laa_columns_backward: 3x the forward per sampled value, as tools.flops counts grid_sample's."""
    return 3 * 2 * 4 * math.prod(grad_columns)


def _dpc_knn_flops(x, num_clusters, k, *args, out_shape=None, **kwargs) -> int:
    """hafa::dpc_knn: what the PyTorch path's counted operators do: the B x N x N x C distance products,
    the k-nearest-neighbour selection over every row and three sorts of N scores."""
    B, N, C = x
    return 2 * B * N * N * C + 2 * B * N * N + 3 * 2 * B * N * max(1, math.ceil(math.log2(max(N, 2))))


HAFA_OP_FLOPS = {
    "hafa::laa_columns": shape_wrapper(_sampling_flops),
    "hafa::laa_columns_backward": shape_wrapper(_sampling_backward_flops),
    "hafa::dpc_knn": shape_wrapper(_dpc_knn_flops),
}
FLOP_FORMULAS = {**flop_registry, **{op: shape_wrapper(formula) for op, formula in CUSTOM_FLOPS.items()}}


def tensor_bytes(t: Tensor) -> int:
    """Bytes of the elements a tensor addresses: its size, less the repeats of broadcast (stride 0) dims."""
    return t.element_size() * math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0)


@dataclass
class Cost:
    launches: int = 0
    bytes: int = 0
    flops: int = 0

    def add(self, other: "Cost") -> None:
        self.launches += other.launches
        self.bytes += other.bytes
        self.flops += other.flops


@dataclass
class PassCost:
    """The cost of one pass of one model by part, what built kept constants, and the operators by part."""

    parts: dict[str, Cost] = field(default_factory=lambda: {part: Cost() for part in PARTS})
    kept: Cost = field(default_factory=Cost)
    operators: dict[str, Counter] = field(default_factory=lambda: {part: Counter() for part in (*PARTS, KEPT)})

    @property
    def total(self) -> Cost:
        total = Cost()
        for cost in self.parts.values():
            total.add(cost)
        return total

    def as_dict(self) -> dict:
        return dict(
            total=asdict(self.total),
            parts={part: asdict(cost) for part, cost in self.parts.items()},
            kept_constants=asdict(self.kept),
        )


def _resolve(dotted: str):
    """A module, or a class or function of a module, by dotted name."""
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ModuleNotFoundError, AttributeError) as error:
        raise LookupError(
            f"cost model: the part source {dotted} does not exist (moved? update PART_SOURCES)"
        ) from error


def _code_objects(source) -> set[CodeType]:
    """The code of a function, or of the functions defined in a class's body, with the code nested in them
    (lambdas, comprehensions, inner functions)."""
    members = vars(source).values() if inspect.isclass(source) else [source]
    functions = []
    for member in members:
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            functions += [f for f in (member.fget, member.fset, member.fdel) if f is not None]
        elif callable(member) and hasattr(inspect.unwrap(member), "__code__"):
            functions.append(inspect.unwrap(member))
    codes, pending = set(), [f.__code__ for f in functions]
    while pending:
        code = pending.pop()
        codes.add(code)
        pending += [c for c in code.co_consts if isinstance(c, CodeType)]
    return codes


class SourceParts:
    """The part a call stack belongs to, by the source locations of PART_SOURCES and KEPT_SOURCES."""

    def __init__(self, sources: dict[str, tuple[str, ...]] = PART_SOURCES, kept: tuple[str, ...] = KEPT_SOURCES):
        self.files: dict[str, str] = {}
        self.codes: dict[CodeType, str] = {}
        for part, names in [*sources.items(), (KEPT, kept)]:
            for name in names:
                source = _resolve(name)
                if inspect.ismodule(source):
                    self.files[source.__file__] = part
                else:
                    self.codes.update(dict.fromkeys(_code_objects(source), part))
        self._by_code: dict[CodeType, str | None] = {}

    def _part_of(self, code: CodeType) -> str | None:
        if code not in self._by_code:
            self._by_code[code] = self.codes.get(code) or self.files.get(code.co_filename)
        return self._by_code[code]

    def of_stack(self, frame: FrameType | None) -> str:
        """KEPT if any frame builds a kept constant, else the part of the innermost frame that has one,
        else "rest"."""
        part = None
        while frame is not None:
            found = self._part_of(frame.f_code)
            if found == KEPT:
                return KEPT
            part = part or found
            frame = frame.f_back
        return part or "rest"


class CostCounter(OperatorCounter):
    """Launches, bytes and FLOPs of the operators dispatched, by part (kept constants apart).

    The part comes from the call stack, or during run_backward from the autograd node being run
    (node_part). decompose: as OperatorCounter's (False: the operators as `hafa bench` counts them)."""

    def __init__(self, parts: SourceParts, decompose: bool = True):
        super().__init__(decompose)
        self.parts = parts
        self.cost = PassCost()
        self.node_part: str | None = None

    def record(self, func, args, kwargs, out) -> None:
        part = self.node_part or self.parts.of_stack(sys._getframe(1))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)]
        formula = FLOP_FORMULAS.get(func.overloadpacket) or HAFA_OP_FLOPS.get(func.name())
        if formula is None and func.namespace == "hafa":
            warnings.warn(f"cost model: no FLOPs formula for {func.name()}, counted as 0 (HAFA_OP_FLOPS)", stacklevel=2)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        cost = Cost(1, sum(tensor_bytes(t) for t in tensors), int(flops))
        (self.cost.kept if part == KEPT else self.cost.parts[part]).add(cost)
        self.cost.operators[part][func.overloadpacket.__name__] += 1


def efficient_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """F.scaled_dot_product_attention as torch runs it on a GPU with its memory-efficient kernel: a float
    mask whose rows are not aligned to 16 elements is padded first (a copy), then broadcast."""
    if attn_mask is not None:
        if any(stride % 16 for stride in attn_mask.stride()[:-1]) or attn_mask.stride(-1) != 1:
            length = attn_mask.shape[-1]
            attn_mask = F.pad(attn_mask, (0, 16 - length % 16))[..., :length]
        attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
    log_sum_exp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    out, *_ = aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, log_sum_exp, dropout_p, is_causal, scale=scale
    )
    return out


def _takes_efficient_attention(args: tuple, kwargs: dict) -> bool:
    """What a GPU takes for float32 attention: the memory-efficient kernel (flash and cuDNN attention need
    half precision). Fake CUDA tensors would take the math path (a dozen kernels): their device has no
    properties to choose by."""
    query, attn_mask = args[0], kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    mask_is_float = attn_mask is None or attn_mask.is_floating_point()
    return (
        query.device.type == "cuda" and query.dtype == torch.float32 and mask_is_float and not kwargs.get("enable_gqa")
    )


class GpuCalls(TorchFunctionMode):
    """Torch calls as on a GPU: attention on fake CUDA tensors by efficient_attention; and, with
    label_nodes, every autograd node a call makes labelled with the part of that call
    (node.metadata[PART_KEY]): the unlabelled nodes reachable from its outputs and from its tensor
    arguments (in-place calls)."""

    def __init__(self, parts: SourceParts, label_nodes: bool):
        super().__init__()
        self.parts = parts
        self.label_nodes = label_nodes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _takes_efficient_attention(args, kwargs):
            out = efficient_attention(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if self.label_nodes:
            self._label(out, args, kwargs)
        return out

    def _label(self, out, args: tuple, kwargs: dict) -> None:
        nodes = [t.grad_fn for t in tree_leaves((out, args, kwargs)) if isinstance(t, Tensor) and t.grad_fn is not None]
        unlabelled = [node for node in nodes if PART_KEY not in node.metadata]
        if not unlabelled:
            return
        part = self.parts.of_stack(sys._getframe(2))
        while unlabelled:
            node = unlabelled.pop()
            if node is not None and PART_KEY not in node.metadata:
                node.metadata[PART_KEY] = part
                unlabelled += [next_node for next_node, _ in node.next_functions]


def _obeys_layout(grad: Tensor, variable: Tensor) -> bool:
    """Whether autograd may keep grad as variable.grad without a copy: the variable's strides wherever a
    dimension has more than one element (AccumulateGrad's layout contract, for dense parameters)."""
    return all(
        (stride == wanted) if size != 1 else stride != 0
        for size, stride, wanted in zip(grad.shape, grad.stride(), variable.stride())
    )


def _is_leaf(node) -> bool:
    """Whether an autograd node is AccumulateGrad, which hands a leaf (a parameter) its gradient."""
    return hasattr(node, "variable")


class _GradientBuffers:
    """The gradients waiting at each autograd node's inputs, as the engine's input buffers hold them."""

    def __init__(self):
        self.buffers: dict = {}
        self.holders = Counter()  # how many buffers hold each gradient tensor (by id)

    def add(self, node, input_nr: int, grad: Tensor) -> None:
        """Hand a gradient to a node's input as the engine does: brought to the input's shape (a broadcast
        summed away) and dtype, and added to what the input already has."""
        metadata = node._input_metadata[input_nr]
        if tuple(grad.shape) != tuple(metadata.shape):
            grad = grad.sum_to_size(metadata.shape)
        if grad.dtype != metadata.dtype:
            grad = grad.to(metadata.dtype)
        buffer = self.buffers.setdefault(node, [None] * len(node._input_metadata))
        if buffer[input_nr] is not None:
            self._release(buffer[input_nr])
            grad = buffer[input_nr] + grad
        buffer[input_nr] = grad
        self.holders[id(grad)] += 1

    def take(self, node) -> list:
        """A node's input gradients (None where none came), out of the buffers."""
        grads = self.buffers.pop(node, [None] * len(node._input_metadata))
        for grad in grads:
            if grad is not None:
                self._release(grad)
        return grads

    def shared(self, grad: Tensor) -> bool:
        """Whether another buffer still holds this gradient (then a parameter cannot keep it as it is)."""
        return id(grad) in self.holders

    def _release(self, grad: Tensor) -> None:
        self.holders[id(grad)] -= 1
        if not self.holders[id(grad)]:
            del self.holders[id(grad)]  # the id may name another tensor once this one is freed


def run_backward(loss: Tensor, counter: CostCounter) -> None:
    """What loss.backward() runs, node by node, each node's operators attributed to its label: the
    engine's own operators too (the sum of the gradients that meet at a node, the reduction of a broadcast
    gradient to its input's shape, a cast to its dtype, and the copy of a parameter's gradient into the
    parameter's layout when it cannot be kept as it is). Node hooks are not run; the models have none."""
    root = loss.grad_fn
    waiting_for, seen, pending = Counter(), {root}, [root]
    while pending:
        for next_node, _ in pending.pop().next_functions:
            if next_node is not None:
                waiting_for[next_node] += 1
                if next_node not in seen:
                    seen.add(next_node)
                    pending.append(next_node)
    buffers = _GradientBuffers()
    buffers.add(root, 0, torch.ones_like(loss))
    ready = [root]
    while ready:
        node = ready.pop()
        grads = buffers.take(node)
        counter.node_part = node.metadata.get(PART_KEY, "rest")
        if _is_leaf(node):
            _accumulate(node.variable, grads[0], buffers)
            continue
        now_ready = []
        for (next_node, input_nr), grad in zip(node.next_functions, _call(node, grads)):
            if next_node is None:
                continue
            if grad is not None:
                buffers.add(next_node, input_nr, grad)
            waiting_for[next_node] -= 1
            if waiting_for[next_node] == 0:
                now_ready.append(next_node)
        # The engine runs the AccumulateGrads first, while the other edges still hold their gradients.
        ready += sorted(now_ready, key=_is_leaf)
    counter.node_part = None


def _call(node, grads: list) -> tuple:
    """A node's input gradients from its output gradients (None where no gradient flows)."""
    if all(grad is None for grad in grads):
        return (None,) * len(node.next_functions)
    outputs = node(*grads) if callable(node) else node.apply(*grads)
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _accumulate(variable: Tensor, grad: Tensor | None, buffers: _GradientBuffers) -> None:
    """AccumulateGrad: keep grad as variable.grad, or copy it into the variable's layout, or add it."""
    if grad is None:
        return
    if variable.grad is not None:
        variable.grad = variable.grad + grad
    elif not buffers.shared(grad) and _obeys_layout(grad, variable):
        variable.grad = grad.detach()
    else:
        variable.grad = grad.new_empty_strided(variable.shape, variable.stride()).copy_(grad)


def fake_model(make_model: Callable[[], nn.Module], fake_mode: FakeTensorMode, device: str = "cuda") -> nn.Module:
    """make_model() built on the meta device (no arithmetic), then given fake parameters and buffers."""
    with torch.device("meta"):
        model = make_model()
    with fake_mode:
        return model.to_empty(device=device)


def count_pass(
    model: nn.Module,
    pass_name: str,
    batch: int,
    img_size: int,
    parts: SourceParts,
    backward: Callable[[Tensor, CostCounter], None] = run_backward,
) -> CostCounter:
    """Count one pass of a fake model (inside its FakeTensorMode) on a batch of img_size images.
    backward: how the training step's backward runs (on fake CPU tensors the engine itself can)."""
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    counter = CostCounter(parts)
    if pass_name == "forward":
        model.eval()
        with torch.inference_mode(), counter, GpuCalls(parts, label_nodes=False):
            model(images)
        return counter
    model.train()
    with counter:
        with GpuCalls(parts, label_nodes=True):
            logits = model(images)
            loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=device))
        backward(loss, counter)
    return counter


def count_model(
    make_model: Callable[[], nn.Module], batches: dict[str, int], img_size: int, kernels: str = "torch"
) -> dict[str, CostCounter]:
    """The counters of each pass (name -> batch) of one model, with the kernels of use_kernels(kernels)."""
    parts = SourceParts()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(make_model, fake_mode)
    with fake_mode, use_kernels(kernels):
        return {name: count_pass(model, name, batch, img_size, parts) for name, batch in batches.items()}


def cost_rows(
    models: list[str], forward_batch: int, train_batch: int, img_size: int, kernels: str = "torch", bar=None
) -> list[dict]:
    """One row per HAFA model and pass: its counts and its baseline's (BASELINE), and HAFA / baseline
    (bar: a hafa.progress bar, advanced once per model counted)."""
    batches = {"forward": forward_batch, "train": train_batch}
    rows = []
    for name in models:
        counted = {}
        for model_name in (name, BASELINE[name]):
            counted[model_name] = count_model(partial(sized_model, model_name, img_size), batches, img_size, kernels)
            if bar is not None:
                bar.update()
        for pass_name, batch in batches.items():
            ours, theirs = counted[name][pass_name].cost, counted[BASELINE[name]][pass_name].cost
            ours_total, theirs_total = ours.total, theirs.total
            rows.append(
                {
                    "model": name,
                    "baseline": BASELINE[name],
                    "img_size": img_size,
                    "batch": batch,
                    "pass": pass_name,
                    "kernels": kernels,
                    "launches_ratio": ratio(ours_total.launches, theirs_total.launches),
                    "bytes_ratio": ratio(ours_total.bytes, theirs_total.bytes),
                    "flops_ratio": ratio(ours_total.flops, theirs_total.flops),
                    "counts": {"hafa": ours.as_dict(), "baseline": theirs.as_dict()},
                }
            )
    return rows
