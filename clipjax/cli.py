"""What every clipjax command line shares: user errors as one line `error: ...` on stderr and exit status 2.

An entry point parses its arguments with `ArgumentParser` (a usage error is one `error:` line, status 2; `--help`
exits 0) and runs its work through `run_main`:

    def _run(argv):                      # raises ValueError, OSError, ... for bad input
        args = parser().parse_args(argv)
        ...

    def main(argv=None) -> int:          # 0, or USER_ERROR_STATUS after printing one `error:` line
        return cli.run_main(_run, argv)

    if __name__ == "__main__":
        sys.exit(main())

Exceptions of the user-error types (`default_user_errors()`, or those passed as `user_errors=`) are printed as
one line; anything else is a bug and keeps its traceback. With CLIPJAX_DEBUG=1 user errors show their traceback
too. `fail(message)` ends the process with a user error from anywhere (e.g. a check of the arguments).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

USER_ERROR_STATUS = 2
DEBUG_ENV = "CLIPJAX_DEBUG"


def one_line(message: Any) -> str:
    """`message` as a single line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(message).split())


def print_error(message: Any) -> None:
    """Print `error: <message>` as one line on stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def warn(message: Any) -> None:
    """Print `warning: <message>` as one line on stderr (for input that was partly usable)."""
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


def fail(message: Any) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with USER_ERROR_STATUS."""
    print_error(message)
    sys.exit(USER_ERROR_STATUS)


def debug() -> bool:
    """Whether user errors should keep their traceback (CLIPJAX_DEBUG set to anything but '' or '0')."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def default_user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, a refused run or an environment that refused a read or write.

    ValueError covers the project's input errors (ConfigError, DatasetError, UnsafeCheckpointError, WeightsError,
    NonFiniteFeaturesError, ...); OSError covers missing, unreadable and unwritable files. Imported late: the
    checkpoint and run-control errors pull in JAX.
    """
    from clipjax.checkpoint import CheckpointError
    from clipjax.run_control import NonFiniteError

    return ValueError, OSError, CheckpointError, NonFiniteError


class _StorageClientEchoes(logging.Filter):
    """Drops the records of one storage-client logger whose message holds one of ``echoes``."""

    def __init__(self, echoes: Sequence[str]):
        super().__init__()
        self.echoes = tuple(echoes)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(echo in message for echo in self.echoes)


# What the storage clients log on the way to an error that clipjax reports itself (one `error:` line, or a skipped
# shard with its reason), by logger: gcsfs's error before it raises (with a traceback), its bucket-type probe that
# fell back, its note at import that optional features are on; google-auth's failed credentials lookup off GCE.
# Their other records pass.
STORAGE_CLIENT_ECHOES = {
    "gcsfs": ("gcsfs experimental features enabled", "Could not determine bucket type",
              "lack permissions for storage layout api", "out of retries on exception", "non-retriable exception"),
    "google.auth._default": ("Authentication failed using Compute Engine authentication",),
    # not a storage client: JAX's probe for a TPU on every start where libtpu is not installed (a CPU or GPU host)
    "jax._src.xla_bridge": ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so",),
}


def quiet_storage_clients() -> None:
    """Keeps the storage clients' echoes of an error off stderr, so that a failed gs:// path ends in one `error:`
    line: the log records of ``STORAGE_CLIENT_ECHOES``, and google-api-core's warnings at import about the Python
    version or its dependencies' versions (support notices, not about this run). Idempotent; CLIPJAX_DEBUG=1 keeps
    them all."""
    if debug():
        return
    for name, echoes in STORAGE_CLIENT_ECHOES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _StorageClientEchoes) for f in logger.filters):
            logger.addFilter(_StorageClientEchoes(echoes))
    warnings.filterwarnings("ignore", r"You are using a (non-supported )?Python version|DEPRECATION: Package ",
                            FutureWarning, r"google\.api_core\.")


def run_main(fn: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None, *,
             user_errors: tuple[type[BaseException], ...] | None = None) -> int:
    """`fn(argv)` → its int result (None or any other result: 0). A user error (`user_errors`, by default
    `default_user_errors()`, resolved only when something was raised) prints one `error:` line and returns
    USER_ERROR_STATUS; other exceptions (bugs) propagate with their traceback, as does SystemExit."""
    quiet_storage_clients()
    try:
        result = fn(argv)
    except Exception as e:
        if not isinstance(e, user_errors if user_errors is not None else default_user_errors()) or debug():
            raise
        print_error(e)
        return USER_ERROR_STATUS
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def integer(minimum: int = 1) -> Callable[[str], int]:
    """An argparse `type=`: an integer of at least `minimum` (a usage error names the flag and the value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with clipjax's error convention: a usage error is one `error: ...` line and exit status 2 (plain
    argparse prints the usage first); the description keeps its line breaks."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        """argparse's, refusing an option given more than once (argparse keeps the last: an unquoted shell pattern
        in a value becomes one option per match) unless it collects values (append, count)."""
        args = list(sys.argv[1:] if args is None else args)
        given: dict[str, list[str]] = {}
        for arg in args:
            if arg == "--":
                break
            action = self._option_action(arg.split("=", 1)[0]) if arg.startswith("-") else None
            if action is not None and not isinstance(action, _COLLECTING):
                given.setdefault(action.dest, []).append(arg)
        for repeated in (a for a in given.values() if len(a) > 1):
            shown = ", ".join(repr(a if len(a) <= 60 else a[:57] + "...") for a in repeated[:2])
            self.error(f"{repeated[0].split('=', 1)[0]} is given {len(repeated)} times ({shown}"
                       f"{', ...' if len(repeated) > 2 else ''}): give it once; quote a {{a..b}} or * pattern, or the "
                       f"shell expands it into one argument per match")
        return super().parse_known_args(args, namespace)

    def _option_action(self, option: str) -> argparse.Action | None:
        """The action of `option` as argparse resolves it (an unambiguous prefix of a long option too)."""
        if option in self._option_string_actions:
            return self._option_string_actions[option]
        if not (self.allow_abbrev and option.startswith("--")):
            return None
        matches = {id(a): a for o, a in self._option_string_actions.items() if o.startswith(option)}
        return next(iter(matches.values())) if len(matches) == 1 else None


# actions that are meant to be given several times
_COLLECTING = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction, argparse._HelpAction,
               argparse._VersionAction)
