"""The ``sslplug`` command: ``run`` pre-trains, ``eval`` and ``finetune`` measure what a run
learned with few labels, ``export`` writes its backbone, ``list`` shows the installed plugins.

Every command is one :class:`Command` in the table :data:`COMMANDS`: its name, its help, a
function that adds its arguments to its ``argparse`` parser, and a function that does it.
:func:`main` builds the parser from that table, in its order, and calls the command chosen.
Each built-in command is a module of this package (``run``, ``listing``, ``new_plugin``,
``info``, ``evaluation``, ``finetune``, ``export``, ``prepare``, ``bench``) defining
``add_arguments(parser)`` and ``run(args, registry) -> int``; what ``eval`` and ``finetune``
share is in :mod:`sslplug.commands.saved_run`.

A plugin adds a command the same way, through :func:`register_command`, before ``main``
builds its parser::

    from sslplug.commands import Command, register_command

    def add_arguments(parser):
        parser.add_argument("source", type=Path)

    def run(args, registry):
        print(f"{args.source}: ...")
        return 0

    register_command(Command("inspect", "one line of help", add_arguments, run))

``run`` receives the parsed arguments and the loaded :class:`~sslplug.plugins.PluginRegistry`
and returns the exit status. An :class:`~sslplug.errors.SslplugError` it raises is printed as
``sslplug: error: ...`` with status 2, like those of the built-in commands.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence

import attrs

from sslplug import __version__
from sslplug.commands import (
    bench,
    evaluation,
    export,
    finetune,
    info,
    listing,
    new_plugin,
    prepare,
    run,
)
from sslplug.errors import PluginError, SslplugError
from sslplug.plugins import PluginRegistry

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register_command"]


@attrs.frozen
class Command:
    """One ``sslplug`` command.

    Attributes:
        name: what is typed after ``sslplug``.
        help: the line ``sslplug --help`` shows for it.
        add_arguments: adds the command's arguments to its own parser.
        run: does the command with the parsed arguments and the plugin registry; returns the
            exit status.
        description: the paragraph ``sslplug NAME --help`` starts with (``None``: none).
        epilog: the paragraph it ends with (``None``: none).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, PluginRegistry], int]
    description: str | None = None
    epilog: str | None = None


# The commands, in the order `sslplug --help` lists them.
COMMANDS: list[Command] = [
    Command("run", run.HELP, run.add_arguments, run.run, description=run.DESCRIPTION),
    Command("list", listing.HELP, listing.add_arguments, listing.run),
    Command(
        "new-plugin",
        new_plugin.HELP,
        new_plugin.add_arguments,
        new_plugin.run,
        description=new_plugin.DESCRIPTION,
    ),
    Command("info", info.HELP, info.add_arguments, info.run),
    Command(
        "eval",
        evaluation.HELP,
        evaluation.add_arguments,
        evaluation.run,
        description=evaluation.DESCRIPTION,
        epilog=evaluation.EPILOG,
    ),
    Command(
        "finetune",
        finetune.HELP,
        finetune.add_arguments,
        finetune.run,
        description=finetune.DESCRIPTION,
        epilog=finetune.EPILOG,
    ),
    Command(
        "export", export.HELP, export.add_arguments, export.run, description=export.DESCRIPTION
    ),
    Command(
        "prepare", prepare.HELP, prepare.add_arguments, prepare.run, description=prepare.DESCRIPTION
    ),
    Command("bench", bench.HELP, bench.add_arguments, bench.run),
]


def register_command(command: Command) -> None:
    """Add ``command`` to the end of :data:`COMMANDS`, for parsers built from now on; a name
    already taken is refused, so that a plugin cannot replace a command."""
    taken = [c.name for c in COMMANDS]
    if command.name in taken:
        raise PluginError(
            f"a command named {command.name!r} exists already; commands: {', '.join(taken)}"
        )
    COMMANDS.append(command)


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The parser of the ``sslplug`` command line, one subcommand for each of ``commands``
    (default :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="sslplug",
        description="Self-supervised pre-training of image encoders; every method is a plugin.",
    )
    parser.add_argument("--version", action="version", version=f"sslplug {__version__}")
    parser.add_argument(
        "--strict-plugins",
        action="store_true",
        help="fail when any installed plugin cannot be loaded, instead of leaving it out",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS if commands is None else commands:
        command.add_arguments(
            sub.add_parser(
                command.name,
                help=command.help,
                description=command.description,
                epilog=command.epilog,
            )
        )
    return parser


def _load_registry(strict: bool) -> PluginRegistry:
    """The installed plugins (``strict``: any that fails to load is an error). ``main`` looks
    this name up when it runs, so that tests can register a plugin more by replacing it."""
    registry = PluginRegistry(strict=strict)
    registry.load_entry_points()
    return registry


def _torch_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """How many threads torch should use: one per core this process may run on.

    ``None`` leaves torch's own choice: when ``OMP_NUM_THREADS`` is set (the user's word, and
    torchrun's, which sets 1 for each of several processes on a machine), or when the platform
    cannot say which cores the process may use (no ``os.sched_getaffinity``). Threads beyond
    those cores take turns on them and slow each other down many times over: two runs sharing
    two cores ran ten times slower than one.
    """
    if environ.get("OMP_NUM_THREADS"):
        return None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return None


def _set_up(verbose: bool) -> None:
    """Warnings, logging, and torch's thread count, once the arguments are parsed."""
    # plugin authors must see what the contract deprecates, which Python hides by default
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"sslplug(\.|$)")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import torch  # after parsing: --help and --version need not wait for it

    threads = _torch_threads()
    if threads is not None:
        torch.set_num_threads(threads)
        why = "one per core this process may run on"
    else:
        why = "OMP_NUM_THREADS is set" if os.environ.get("OMP_NUM_THREADS") else "torch's default"
    # the logger's name, which -v shows, is the one it had when the command line was cli.py
    logger = logging.getLogger("sslplug.cli")
    logger.debug("torch uses %d thread(s): %s", torch.get_num_threads(), why)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_up(args.verbose)
    try:
        registry = _load_registry(args.strict_plugins)
        command = next(c for c in COMMANDS if c.name == args.command)
        return command.run(args, registry)
    except SslplugError as exc:
        print(f"sslplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslplug: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        return _name_too_long(exc)


def _name_too_long(exc: OSError) -> int:
    """Say that a path given to read is too long to exist (names to write are checked before
    anything is written, with messages of their own); the exit status."""
    name = str(exc.filename)
    shown = name if len(name) <= 60 else f"{name[:30]}...{name[-20:]}"
    print(
        f"sslplug: error: the path {shown!r} is too long for the file system (a file or "
        f"folder name may have at most 255 bytes on the usual ones), so nothing is there: "
        f"check the path",
        file=sys.stderr,
    )
    return 2
