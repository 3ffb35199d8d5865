"""The `hafa` command line: `hafa <command> [options]`; `hafa <command> -h` for a command's options."""

import argparse
import difflib
import importlib
import inspect
import sys
from collections.abc import Callable
from functools import partial

from .errors import UserError, message_of
from .spec import check_defaults

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
    "ablate": (
        "hafa.tools.ablate",
        "the paper's ablations (Tables 4 and 5, cluster ratio, k) as training runs with seeds -> table, CSV, PNG",
    ),
    "export": (
        "hafa.tools.export",
        "ONNX export with a dynamic batch, checked by onnxruntime; --compile: torch.compile check",
    ),
}


def _load(target: str) -> tuple[Callable, Callable]:
    """'module' or 'module:name' -> the command's (add_arguments(parser, argv), run(args)); a command whose
    options depend on what is typed (hafa ablate's on --task) reads argv, the others ignore it."""
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    prefix = f"{name}_" if name else ""
    add_arguments = getattr(module, f"add_{prefix}arguments")
    if len(inspect.signature(add_arguments).parameters) == 1:
        add_arguments = partial(_without_argv, add_arguments)
    return add_arguments, getattr(module, f"run_{name}" if name else "run")


def _without_argv(add_arguments: Callable, parser: argparse.ArgumentParser, argv: list[str]) -> None:
    add_arguments(parser)


# Options a newcomer may bring from another command: what this command takes instead.
OTHER_COMMANDS_OPTIONS = {
    "--epochs": "seg-train counts its length in --iterations (rounded to whole epochs), not --epochs",
    "--iterations": "this command counts its length in --epochs; seg-train is the one with --iterations",
}


class CommandParser(argparse.ArgumentParser):
    """A parser whose error names the closest known option for an unknown one (after its own usage)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            unknown = [word.partition("=")[0] for word in message.split(": ", 1)[1].split() if word.startswith("-")]
            known = [option for action in self._actions for option in action.option_strings]
            hints = []
            for option in unknown:
                if option in OTHER_COMMANDS_OPTIONS:
                    hints.append(OTHER_COMMANDS_OPTIONS[option])
                elif close := difflib.get_close_matches(option, known, n=3, cutoff=0.6):
                    hints.append(f"{option}: did you mean {' or '.join(close)}?")
            if hints:
                message += "; " + "; ".join(hints)
        elif message.endswith("expected one argument"):
            message += " (a value that starts with '-' is written --option=-1)"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = CommandParser(prog="hafa", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True, parser_class=CommandParser)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, description=help_text)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # -h, or the usage and an error naming the commands
        return 2
    name = argv[0]
    add_arguments, run = _load(COMMANDS[name][0])
    command = commands.choices[name]
    try:
        add_arguments(command, argv[1:])
        args = command.parse_args(argv[1:])  # this command's own usage on an error
        args.command = name
        check_defaults(command, args)
        return run(args) or 0
    except UserError as error:
        print(f"hafa {name}: error: {message_of(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hafa {name}: aborted without saving", file=sys.stderr)
        return 130
