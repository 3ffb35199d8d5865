"""The `hafa` command line: `hafa <command> [options]`; `hafa <command> -h` for a command's options."""

import argparse
import importlib
import sys
from collections.abc import Callable

from .errors import UserError, message_of

# command -> ("module" with add_arguments(parser) and run(args), or "module:name" with add_<name>_arguments
# and run_<name>, one-line help).
# A command's module is imported only when that command runs, so that `hafa -h` is instant.
COMMANDS = {
    "train": (
        "hafa.tasks.classification:train",
        "train classifiers (default: HAFA vs baseline on the embedded MNIST-5k)",
    ),
    "eval": ("hafa.tasks.classification:eval", "evaluate a classifier checkpoint: top-1, top-5, loss"),
    "seg-train": (
        "hafa.tasks.segmentation:train",
        "train Semantic FPN segmenters (default: HAFA vs baseline on the embedded scenes)",
    ),
    "seg-eval": (
        "hafa.tasks.segmentation:eval",
        "evaluate a segmentation checkpoint: mIoU, per-class IoU, pixel accuracy",
    ),
    "det-train": (
        "hafa.tasks.detection:train",
        "train Mask R-CNN detectors (default: HAFA vs baseline on the embedded scenes)",
    ),
    "det-eval": ("hafa.tasks.detection:eval", "evaluate a detection checkpoint: box and mask AP (COCOeval)"),
    "predict": (
        "hafa.tasks.predict",
        "one image through a classification, segmentation or detection checkpoint -> PNG",
    ),
    "models": ("hafa.tools.models", "list the models: parameters, GMACs, the paper's numbers"),
    "bench": ("hafa.tools.bench", "time, size and memory of HAFA models beside their baselines; --modules: LAA / SIA"),
    "visualize": ("hafa.tools.visualize", "one PNG: an image, SIA's clusters and LAA's sampling points"),
    "export": (
        "hafa.tools.export",
        "ONNX export with a dynamic batch, checked by onnxruntime; --compile: torch.compile check",
    ),
}


def _load(target: str) -> tuple[Callable, Callable]:
    """'module' or 'module:name' -> the command's (add_arguments(parser), run(args))."""
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    prefix = f"{name}_" if name else ""
    return getattr(module, f"add_{prefix}arguments"), getattr(module, f"run_{name}" if name else "run")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hafa", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, description=help_text)
    if argv and argv[0] in COMMANDS:
        add_arguments, _ = _load(COMMANDS[argv[0]][0])
        add_arguments(commands.choices[argv[0]])
    args = parser.parse_args(argv)
    _, run = _load(COMMANDS[args.command][0])
    try:
        return run(args) or 0
    except UserError as error:
        print(f"hafa {args.command}: error: {message_of(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hafa {args.command}: aborted without saving", file=sys.stderr)
        return 130
