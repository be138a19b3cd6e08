"""What every command-line program shares: one-line errors.

    if __name__ == "__main__":
        flags.DEFINE_...(...)
        cli.run(main)

`run` is absl's `app.run` with the project's error reporting:

* a `UserError` raised by `main` (moco_jax.core.errors), an OSError (a path
  that cannot be read or written), a bad flag, an unknown or ill-typed
  `--config.<field>` override, or a config file that cannot be loaded is
  printed as one line, `error: <message>`, on stderr, and the program exits
  with status 2 (flags) or 1 (everything else);
* the traceback is shown only with `--verbose` or MOCO_JAX_VERBOSE=1, for a
  bug report;
* a StorageError (a checkpoint that failed to write) exits without waiting
  for orbax's background threads, which may hang on the failed save;
* Ctrl-C (KeyboardInterrupt) in a program that does not handle it is one
  line too, exit status 130;
* any other exception is a bug and keeps its traceback.

`--help` (`-h`, `--helpshort`) prints the program's docstring and its own
flags (with `--config` and `--verbose`), and exits 0; `--helpfull` is
absl's list of every flag. A `--config` path that is not found under the
current directory is looked up in the repository the package belongs to, so
`--config configs/X.py` works from any directory once the package is
installed with `pip install -e .`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import app, flags

from moco_jax.core.config import flatten_dotted, no_such_field
from moco_jax.core.errors import UserError
from moco_jax.training import console

ENV_VERBOSE = "MOCO_JAX_VERBOSE"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# The checkout the package lives in (its configs/ folder), for an editable install.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--help=true")


def verbose(argv: Sequence[str] | None = None) -> bool:
    """--verbose on the command line (read before flag parsing, which may be
    what fails) or $MOCO_JAX_VERBOSE set to a true value."""
    argv = sys.argv if argv is None else argv
    if os.environ.get(ENV_VERBOSE, "").lower() in ("1", "true", "yes"):
        return True
    return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv[1:])


def one_line(message: object) -> str:
    """A message with its line breaks and runs of spaces folded into one line."""
    return " ".join(str(message).split())


def fail(message: object, status: int = EXIT_ERROR) -> None:
    """Print `error: message` on one line of stderr and exit with `status`."""
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def define_config_file(name: str, default: str | None, help_string: str):
    """config_flags.DEFINE_config_file, with a config file that cannot be
    loaded, or an override the config cannot take, reported in one line
    (config_flags loads the file and applies --<name>.X overrides right here,
    at definition, from sys.argv)."""
    from ml_collections import config_flags  # noqa: PLC0415 - only programs with a config need it

    _resolve_config_argument(name)
    if default:
        _make_importable(default)
    _DEFAULTS[name] = default
    try:
        return config_flags.DEFINE_config_file(name, default, help_string)
    except Exception as e:  # noqa: BLE001 - every failure here comes from the command line
        if verbose():
            raise
        fail(_config_error_message(e, name, sys.argv), EXIT_USAGE)


def resolve_config_path(path: str) -> str:
    """`path[:argument]` of a config file; a relative path not found under
    the current directory is taken relative to the repository root."""
    file, sep, argument = path.partition(":")
    if not file or os.path.isabs(file) or os.path.isfile(file):
        return path
    candidate = os.path.join(REPO_ROOT, file)
    return candidate + sep + argument if os.path.isfile(candidate) else path


def _make_importable(path: str) -> None:
    """Config files import each other as `from configs import default`: put
    the folder holding `configs/` on sys.path, wherever the program runs."""
    folder = os.path.dirname(os.path.abspath(path.partition(":")[0]))
    if os.path.basename(folder) == "configs" and os.path.dirname(folder) not in sys.path:
        sys.path.append(os.path.dirname(folder))


def _resolve_config_argument(flag: str) -> None:
    """Rewrite `--<flag>=PATH` / `--<flag> PATH` in sys.argv with
    `resolve_config_path` (config_flags reads sys.argv itself)."""
    argv = sys.argv
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith(f"--{flag}="):
            argv[i] = f"--{flag}={resolve_config_path(arg.split('=', 1)[1])}"
            _make_importable(argv[i].split("=", 1)[1])
        elif arg == f"--{flag}" and i + 1 < len(argv):
            argv[i + 1] = resolve_config_path(argv[i + 1])
            _make_importable(argv[i + 1])


def run(main: Callable[[list[str]], int | None]) -> None:
    """absl's app.run(main) with one-line errors (see the module docstring)."""
    # TensorFlow (tf.data, imported later by the file-based datasets) would
    # otherwise print its C++ start-up notices on stderr around the error.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show everything: every library's log lines in absl's full format, and "
                          f"the traceback of an error (or set ${ENV_VERBOSE}=1).")
    app.run(_reporting(main), flags_parser=parse_flags)


def _reporting(main):
    def wrapped(argv):
        try:
            if len(argv) > 1:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
            console.setup(verbose())
            return main(argv)
        except (UserError, OSError, app.UsageError) as e:  # OSError: a path the program cannot read or write
            if getattr(e, "abandon_threads", False):
                _exit_abandoning_threads(e)
            if verbose():
                raise
            fail(_error_message(e), EXIT_USAGE if isinstance(e, app.UsageError) else EXIT_ERROR)
        except KeyboardInterrupt as e:  # Ctrl-C in a program without handlers of its own
            if verbose():
                raise
            fail(one_line(e) or "interrupted by SIGINT", EXIT_INTERRUPTED)

    return wrapped


def _exit_abandoning_threads(error: BaseException) -> None:
    """Report `error` and exit now, without joining background threads: after
    a failed checkpoint write orbax's threads can wait minutes for a save that
    will never finish. (The workdir lock was released on the way here.)"""
    if verbose():
        traceback.print_exception(error)
    sys.stdout.flush()
    sys.stderr.write(f"error: {_error_message(error)}\n")
    sys.stderr.flush()
    os._exit(EXIT_ERROR)


def _error_message(error: BaseException) -> str:
    """A user error as it is printed: its message; for a bare OSError also
    its kind ("PermissionError: [Errno 13] Permission denied: 'x'")."""
    if isinstance(error, OSError) and not isinstance(error, UserError):
        return f"{type(error).__name__}: {one_line(error)}"
    return one_line(error)


def parse_flags(argv: list[str]) -> list[str]:
    """FLAGS(argv), with every parsing failure reported in one line."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(program_help())
        raise SystemExit(0)
    try:
        remaining = flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many kinds; all are the user's flags
        if verbose(argv):
            raise
        fail(_flag_error_message(e, argv), EXIT_USAGE)
    if not verbose(argv):
        _check_config_loaded(argv)
    return remaining


def _check_config_loaded(argv: Sequence[str]) -> None:
    """config_flags keeps a config file it could not read (a missing file, an
    IOError inside get_config) as a placeholder that raises when first used;
    report it now, in one line."""
    for name in _config_flags():
        value = flags.FLAGS[name].value
        if type(value).__name__ == "_ErrorConfig":
            error = object.__getattribute__(value, "_error")
            fail(_config_problem(name, argv) or f"--{name}: the config file cannot be loaded: {one_line(error)}",
                 EXIT_USAGE)


# Modules whose flags are not the program's: absl's own, and libraries'.
_FOREIGN_FLAG_MODULES = ("absl", "jax", "tensorflow", "tensorboard", "orbax", "grain", "etils")


def program_help() -> str:
    """The program's docstring and its own flags (name, help, default)."""
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    lines = [doc, "", "flags:"] if doc else ["flags:"]
    own = []
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if not os.path.basename(module).startswith(_FOREIGN_FLAG_MODULES) and not module.startswith(
                _FOREIGN_FLAG_MODULES):
            own.extend(module_flags)
    for flag in sorted({f.name: f for f in own}.values(), key=lambda f: (f.name != "config", f.name)):
        default = _DEFAULTS.get(flag.name, flag.default) if flag.name in _DEFAULTS else flag.default
        lines.append(f"  --{flag.name}: {one_line(flag.help)}" + (f" (default: {default!r})" if default not in
                                                                   (None, "") else ""))
        if flag.name in _DEFAULTS:
            lines.append(f"      --{flag.name}.<field>=<value> overrides one field; `python -m moco_jax.config_fields "
                         f"--config FILE` lists the fields")
    lines.append("  --helpfull: every flag, the libraries' included")
    return "\n".join(lines)


def _config_flags() -> list[str]:
    """The config-file flags this program defined (with `define_config_file`)."""
    return [name for name in _DEFAULTS if name in flags.FLAGS]


def _flag_error_message(error: Exception, argv: Sequence[str]) -> str:
    for flag in _config_flags():  # the config files and their overrides first: absl's message for them is poor
        problem = _config_problem(flag, argv)
        if problem:
            return problem
    message = one_line(error)
    missing = re.search(r"Flag --(\w+) must have a value other than None", message)
    if missing and missing.group(1) in flags.FLAGS:  # absl's words for a required flag left out
        name = missing.group(1)
        return f"--{name} is required: {one_line(flags.FLAGS[name].help)} (see --helpshort)"
    if isinstance(error, flags.Error):
        return f"{message} (see --helpshort)"
    return message


def _config_error_message(error: Exception, flag: str, argv: Sequence[str]) -> str:
    return _config_problem(flag, argv) or f"--{flag}: {type(error).__name__}: {one_line(error)}"


def _config_problem(flag: str, argv: Sequence[str]) -> str | None:
    """What is wrong with `--<flag>` and its overrides on this command line, or None."""
    path = _config_path(argv, flag)
    if not path:
        return None
    path = resolve_config_path(path)
    file = (path or "").partition(":")[0]
    if path and not os.path.isfile(file):
        return (f"--{flag}={path}: no such config file (give a path to a .py file with get_config(), "
                "e.g. configs/default.py)")
    try:
        config = load_config_file(path)
    except Exception as e:  # noqa: BLE001
        return f"--{flag}={path}: the config file cannot be loaded: {type(e).__name__}: {one_line(e)}"
    unknown = unknown_config_fields(argv, flag, config, file)
    return "; ".join(unknown) if unknown else None


# ---------------------------------------------------------------------------
# The config file behind a config flag.
# ---------------------------------------------------------------------------
def _config_path(argv: Sequence[str], flag: str) -> str | None:
    """The config file named on the command line for `--<flag>`, else None
    (the caller knows its default)."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return _DEFAULTS.get(flag)


_DEFAULTS: dict[str, str | None] = {}


def load_config_file(path: str):
    """`get_config()` of a config file, `path[:argument]` as config_flags reads it."""
    path = resolve_config_path(path)
    _make_importable(path)
    file, _, argument = path.partition(":")
    spec = importlib.util.spec_from_file_location("_moco_cli_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def config_overrides(argv: Sequence[str], flag: str) -> list[str]:
    """The fields overridden on the command line, `--<flag>.X=...` -> X."""
    names = []
    for arg in argv[1:]:
        if arg.startswith(f"--{flag}."):
            names.append(arg[len(flag) + 3:].split("=", 1)[0])
    return names


def unknown_config_fields(argv: Sequence[str], flag: str, config, file: str) -> list[str]:
    """One message per `--<flag>.X=...` override whose X `config` lacks,
    each with the closest field names."""
    if config is None:
        return []
    fields = list(flatten_dotted(config.to_dict()))
    groups = {f.rsplit(".", 1)[0] for f in fields if "." in f}
    messages = []
    for arg in argv[1:]:
        if not arg.startswith(f"--{flag}."):
            continue
        name = arg[len(flag) + 3 :].split("=", 1)[0]
        if name in fields or name in groups:
            continue
        messages.append(f"--{flag}.{name}: {no_such_field(name, fields, file)}")
    return messages
