"""Command-line training: ``python -m iclm_jax.main --config=experiments/configs/acre.py --workdir=runs/x``.

Every config field is overridable, e.g. ``--config.model.num_modules=4 --config.train.steps=20``; a config
variant is chosen with ``--config=experiments/configs/acre.py:baseline``. Also installed as ``iclm-train``.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from iclm_jax import distributed

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default exists in a source checkout (editable install); an installed wheel needs --config.
_DEFAULT_CONFIG = os.path.join(_REPO, "experiments", "configs", "acre.py")

# No default here: a default is loaded (with the command line's overrides) when the flag is defined, at
# import, where a bad override could only be a traceback. ``_parse_flags`` supplies it instead.
config_flags.DEFINE_config_file(
    "config", None, "get_config(arg) file, optionally ':arg' (default: experiments/configs/acre.py of a "
    "source checkout).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (logs, checkpoints, plots).")
flags.DEFINE_bool("quiet", False, "No progress bar or tables.")


def main(argv) -> None:
    del argv
    # Deferred on purpose: jax.distributed.initialize (below) must come before anything touches a
    # jax backend, and the training stack is only needed once flags are parsed.
    from iclm_jax.config_check import ConfigError
    from iclm_jax.train.disk_space import DiskFull
    from iclm_jax.train.loop import NonFiniteError, train

    logging.set_verbosity(logging.WARNING)   # orbax and jax log every step at INFO
    # A full disk makes orbax's and asyncio's background writers log a traceback each; our one line
    # (DiskFull, below) says it all.
    logging.get_absl_handler().addFilter(_not_disk_full)
    sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    try:
        distributed.initialize_from_flags()
    except (RuntimeError, ValueError) as e:
        print(f"iclm-train: {e}", file=sys.stderr)
        sys.exit(2)
    if not flags.FLAGS.workdir:
        _refuse("--workdir is required")
    if flags.FLAGS.config is None:
        _refuse("--config is required outside a source checkout (give a get_config file, e.g. the "
                "repository's experiments/configs/acre.py:cpu)")
    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir, quiet=flags.FLAGS.quiet)
    except DiskFull as e:
        # Exit at once: the metrics writer's and orbax's threads and atexit hooks would each retry their
        # writes on the full disk and print a traceback. The finalized checkpoints are on disk already.
        print(f"iclm-train: DiskFull: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CODES["DiskFull"])
    except (ConfigError, NonFiniteError, OSError, ValueError) as e:
        # Bad config, bad data files (AcreFormatError / JsonlError name file and problem or line),
        # an unwritable or full workdir, a NaN: one clear line, not a traceback.
        print(f"iclm-train: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(EXIT_CODES.get(type(e).__name__, 2))


# Documented exit statuses: 0 done, 2 refused input (config, data, workdir), 3 non-finite loss, 4 disk
# full during the run (the finalized checkpoints are intact; free space and rerun the same command),
# 143 preempted (SIGTERM: a checkpoint of the current step was saved; rerun the same command to resume).
EXIT_CODES = {"NonFiniteError": 3, "DiskFull": 4}


def _quiet_closed_loops(hook):
    """After a save fails (a full disk), tensorstore's pending writes report back to orbax's event loops,
    closed by then, and each reports ``RuntimeError: Event loop is closed`` as unraisable: dropped."""
    def quiet(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)
    return quiet


def _not_disk_full(record) -> bool:
    try:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    except Exception:   # noqa: BLE001  (a malformed record: let the handler show it)
        return True
    return "No space left on device" not in text and "os_error_code='28'" not in text


def _refuse(message: str) -> None:
    print(f"iclm-train: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with every failure (a bad flag value, an unknown config field or variant, an
    unreadable config file) as one line and exit status 2, like any other refused input."""
    if os.path.isfile(_DEFAULT_CONFIG) and not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
    try:
        rest = flags.FLAGS(argv)
        if flags.FLAGS.config is not None:   # overrides apply lazily, on first access: fail here, not in main
            flags.FLAGS.config.lock()
        return rest
    except Exception as e:   # noqa: BLE001  (config files are user code: any error is a refused input)
        name = str(e).strip("'\"")
        culprit = next((a for a in argv[1:] if a.startswith("--config") and name and name in a), None)
        where = f" ({culprit})" if culprit else ""
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        if isinstance(e, AttributeError):
            detail = f"no such config field {name!r}"
        elif any(x.startswith("Traceback") for x in lines):    # an error inside the config file's code
            detail = f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}"
        else:
            detail = " ".join(lines)
        _refuse(f"bad command line{where}: {detail}")


def run_train() -> None:
    """Console script ``iclm-train``."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_train()
