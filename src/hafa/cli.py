"""The `hafa` command line: `hafa <command> [options]`; `hafa <command> -h` for a command's options."""
import argparse
import difflib
import importlib
import sys

# command -> (module with add_arguments(parser) and run(args), one-line help). A command's module is
# imported only when that command runs, so that `hafa -h` is instant.
COMMANDS = {
    "models": ("hafa.tools.models", "list the models: parameters, GMACs, the paper's numbers"),
}


class UserError(Exception):
    """A problem with the user's input: printed as a message, never as a traceback."""


def unknown_name(kind: str, name: str, known) -> UserError:
    """A UserError for an unknown name, suggesting the closest known ones."""
    close = difflib.get_close_matches(name, list(known), n=4, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown {kind} {name!r}{hint}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hafa", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, description=help_text)
    if argv and argv[0] in COMMANDS:
        importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(commands.choices[argv[0]])
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except UserError as error:
        print(f"hafa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hafa {args.command}: interrupted", file=sys.stderr)
        return 130
