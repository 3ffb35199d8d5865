"""`hafa export`: a HAFA model to ONNX with a dynamic batch axis, checked by onnxruntime; `--compile`
checks torch.compile against eager mode.

The export goes through torch.export (torch.onnx.export(..., dynamo=True), opset 18). What was hard:

- Deformable sampling (LAA): torchvision's deform_conv2d has no ONNX form. LAA is written as one
  F.grid_sample (ONNX GridSample, bilinear, zero padding) and one batched matmul with the layer's
  weights, which is the eager path too; no separate export path.
- DPC-KNN's data-dependent shapes: the number of local density peaks, which eager mode reads with
  int() to scan only those tokens, would make the graph's shapes depend on the data. While exporting
  (torch.compiler.is_exporting()) every token takes the peak path (non-peaks in it change nothing), and
  the row chunking that bounds memory is one chunk, so no loop depends on the batch size. topk, the
  stable sorts, gather and argmin map to TopK, GatherElements and ArgMin.
- Scatters: merging uses scatter_add / scatter_reduce(amax), which become ScatterElements with
  reduction add / max (opset 18), exact with duplicate indices; index_add_, which exports wrongly with
  duplicates, is not used.
- The dictionary is two weighted sums of rows (F.embedding_bag: each pixel a bag of tokens, each token
  a bag of pixels). ONNX has no EmbeddingBag; the exporter writes a Loop over the bags, which
  onnxruntime runs exactly (checked on every export) and fast: at 224 each image's last stage has
  only 49 pixels and 49 tokens, i.e. few bags.
"""

import logging
import time
from collections import Counter
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, check_model_options, check_task
from ..errors import UserError, unknown_name
from ..models.table import BASELINE
from ..spec import OutputFile, Values, Whole, add_setting
from ..tasks.networks import build_classifier_from_state_dict, sized_model
from ..tasks.networks import build_model as build_model_of
from ..tasks.run_settings import image_side
from ..tasks.saved import read_saved_or_state_dict

OPSET = 18
DEFAULT_MODEL = "hafa_pvt_v2_b0"


def add_arguments(parser):
    parser.add_argument(
        "--model", help="HAFA (or baseline) model (default: the checkpoint's, else hafa_pvt_v2_b0 with random weights)"
    )
    parser.add_argument(
        "--checkpoint", help="best.pth / last.pth of hafa train, or a plain state dict with --model and --num-classes"
    )
    add_setting(
        parser, "--num-classes", setting=Whole(None, low=1, optional=True), help="classes of a plain state dict"
    )
    add_setting(parser, "--img-size", setting=image_side(224), help="square input size")
    add_setting(
        parser,
        "--batch",
        setting=Whole(2, low=1),
        help="batch of the example input that is traced (2 or more for an ONNX file with a dynamic batch)",
    )
    add_setting(
        parser,
        "--check-batches",
        setting=Values([1, 3], item=Whole(low=1), min_length=1),
        nargs="+",
        help="batches run by onnxruntime besides the traced one",
    )
    add_setting(parser, "--output", "-o", setting=OutputFile(), help="ONNX file to write (default MODEL.onnx)")
    parser.add_argument(
        "--compile", action="store_true", help="also compare torch.compile(model) with eager mode (outputs and time)"
    )
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (with --compile)")


def build_model(
    name: str | None, checkpoint: str | None = None, num_classes: int | None = None, img_size: int = 224
) -> torch.nn.Module:
    """The model to export, in eval mode: a checkpoint's exact classifier, or `name` with random weights
    (built for img_size inputs)."""
    if checkpoint is None:
        name = name or DEFAULT_MODEL
        known = set(BASELINE) | set(BASELINE.values())
        if name not in known:
            raise unknown_name("model", name, sorted(known))
        torch.manual_seed(0)
        return sized_model(name, img_size, num_classes=1000 if num_classes is None else num_classes).eval()
    source = read_saved_or_state_dict(checkpoint)
    if isinstance(source, Checkpoint):
        check_task(source, "classification", "hafa export")
        check_model_options(source, model_name=name, num_classes=num_classes)
        return build_model_of(source)
    return build_classifier_from_state_dict(source, checkpoint, name, num_classes)


def _stable_sort(self, stable=None, dim: int = -1, descending: bool = False):
    """aten::sort.stable as an ONNX TopK over the whole axis; TopK orders equal values by index, so it
    is stable (the exporter's own table has only the unstable overload)."""
    from onnxscript import opset18 as op

    size = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str) -> None:
    """Write model to path as ONNX (opset 18) with a dynamic batch axis named 'batch'."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # the graph optimiser comments on every part of the exporter's embedding_bag Loops
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
            custom_translation_table={torch.ops.aten.sort.stable: _stable_sort},
        )
    program.save(path)


def onnxruntime_differences(path: str, model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[float]:
    """Max |onnxruntime - PyTorch| of the outputs, for each input."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    differences = []
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        differences.append(float((got - expected).abs().max()))
    return differences


def onnx_op_counts(path: str) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)


def compile_check(model: torch.nn.Module, x: torch.Tensor, reps: int = 3, backend: str = "inductor") -> dict:
    """torch.compile(model, fullgraph=True) (one graph, clustering included) with torch's default shape
    handling against eager: max |difference|, compile seconds, median eager and compiled ms, and then the
    same at another input size (32 pixels more on each side): its graphs, compile seconds and difference."""
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        start = time.perf_counter()
        out = compiled(x)
        compile_s = time.perf_counter() - start
        expected = model(x)
        other = torch.randn(*x.shape[:2], x.shape[2] + 32, x.shape[3] + 32)
        graphs, start = torch._dynamo.utils.counters["stats"]["unique_graphs"], time.perf_counter()
        other_out = compiled(other)
        new_size = dict(
            size=list(other.shape[2:]),
            graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
            compile_s=time.perf_counter() - start,
            max_abs_difference=float((other_out - model(other)).abs().max()),
        )

        def median_ms(fn) -> float:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - start)
            return sorted(times)[len(times) // 2] * 1e3

        eager_ms, compiled_ms = median_ms(model), median_ms(compiled)
    return dict(
        max_abs_difference=float((out - expected).abs().max()),
        compile_s=compile_s,
        eager_ms=eager_ms,
        compiled_ms=compiled_ms,
        new_size=new_size,
    )


def run(args) -> int:
    if args.batch == 1 and not args.no_onnx:
        # torch.export specialises a traced dimension of size 1: the file would take batch 1 only, and
        # the check of other batches would fail on it.
        raise UserError("--batch 1 cannot be traced as a dynamic batch axis: use --batch 2 or more")
    if args.no_onnx and not args.compile:
        raise UserError("--no-onnx leaves nothing to do without --compile")
    if not args.no_onnx:
        OutputFile().check(args.output or f"{args.model or DEFAULT_MODEL}.onnx", "--output")
    model = build_model(args.model, args.checkpoint, args.num_classes, args.img_size)
    name = model.pretrained_cfg["architecture"]
    size = (3, args.img_size, args.img_size)
    torch.manual_seed(1)
    example = torch.randn(args.batch, *size)
    if not args.no_onnx:
        path = args.output or f"{name}.onnx"
        start = time.perf_counter()
        export_onnx(model, example, path)
        print(
            f"wrote {path} ({Path(path).stat().st_size / 2**20:.1f} MB, opset {OPSET}, dynamic batch) "
            f"in {time.perf_counter() - start:.0f} s"
        )
        ops = onnx_op_counts(path)
        notable = [
            op
            for op in ("GridSample", "TopK", "ScatterElements", "GatherElements", "ArgMin", "ArgMax", "Loop")
            if op in ops
        ]
        print("ops: " + ", ".join(f"{op} x{ops[op]}" for op in notable) + f"; {sum(ops.values())} nodes in all")
        batches = [args.batch] + [b for b in args.check_batches if b != args.batch]
        inputs = [example] + [torch.randn(b, *size) for b in batches[1:]]
        for b, difference in zip(batches, onnxruntime_differences(path, model, inputs)):
            print(f"onnxruntime vs PyTorch, batch {b}: max abs difference {difference:.2e}")
    if args.compile:
        result = compile_check(model, example)
        print(
            f"torch.compile vs eager, batch {args.batch}: max abs difference {result['max_abs_difference']:.2e}; "
            f"compiled in {result['compile_s']:.0f} s; "
            f"{result['eager_ms']:.1f} ms eager, {result['compiled_ms']:.1f} ms compiled"
        )
        new = result["new_size"]
        print(
            f"a new input size, {new['size'][0]} x {new['size'][1]}: {new['graphs']} more graph(s), compiled in "
            f"{new['compile_s']:.0f} s; max abs difference {new['max_abs_difference']:.2e}"
        )
    return 0
