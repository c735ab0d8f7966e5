"""Errors shown to the user as one line (the CLI prints them without a traceback), and the overwrite policy of
every command's output (`check_output`, `prepare_output_dir`)."""

from __future__ import annotations

import os


class ToolkitError(Exception):
    """Base class: an error the user can act on."""


class WeightsNotFound(ToolkitError):
    """Checkpoint files for a model could not be found; the message lists paths tried and how to get them."""


class CheckpointError(ToolkitError):
    """A checkpoint file is corrupt, truncated, or does not match the model (names the file / tensors)."""


class SelectionError(ToolkitError):
    """An invalid capture/analysis selection (layer out of range, unknown step, ...)."""


class OutputError(ToolkitError):
    """An output path that is refused: it exists (no --force/--resume), or it cannot be a file/folder or be written."""


# ---- the overwrite policy of every command -------------------------------------------------------------------
# Lives in the base layer so that commands, writers and kernels' CLIs can all share it; it imports only os/fnmatch.


def _nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists (``.`` for a relative path under a missing folder)."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_output(path: str | os.PathLike, *, force: bool = False, resume: bool = False, folder: bool = False,
                 outputs: tuple[str, ...] = (), can_resume: bool = False, option: str = "--out") -> str | None:
    """The one overwrite policy: refuse (`OutputError`, one line) unless ``path`` can be written without losing
    anything; touches nothing. Returns the line to show when existing output is used, else ``None``:
    ``"replacing PATH (--force)"`` or ``"resuming PATH"``.

    ``folder=False``: ``path`` is one file; ``folder=True``: a folder the command writes ``outputs`` into (glob
    patterns, e.g. ``("video.*", "run.json")``), and only those count as existing output. ``can_resume``: the
    command continues an existing output with ``resume`` (else ``resume`` is ignored). Also refused: a file where a
    folder is expected and vice versa, a parent that is a file, a closest existing folder that is not writable."""
    import fnmatch

    path = os.fspath(path)
    if force and resume and can_resume:
        raise OutputError(f"--force replaces {path}, --resume continues it: pass one of them")
    if os.path.isdir(path) and not folder:
        raise OutputError(f"{option} {path} is a folder; {option} takes a file name")
    if os.path.lexists(path) and not os.path.isdir(path) and folder:
        raise OutputError(f"{option} {path} is a file; {option} takes a folder")
    base = _nearest_existing(path)
    if base != os.path.abspath(path) and not os.path.isdir(base):
        raise OutputError(f"cannot create {path}: {base} is a file, not a folder")
    writable = base if os.path.isdir(base) else os.path.dirname(base) or "."
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {writable} is not writable")
    if folder:
        names = sorted(os.listdir(path)) if os.path.isdir(path) else []
        existing = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in outputs)]
        what = f"{path} already holds output ({existing[0]})" if existing else None
    else:
        what = f"{path} exists" if os.path.lexists(path) else None
    if what is None:
        return None
    if resume and can_resume:
        if not folder and not os.access(path, os.W_OK):
            raise OutputError(f"cannot resume {path}: it is not writable")
        return f"resuming {path}"
    if force:
        return f"replacing {path} (--force)"
    choices = "--resume to continue it, --force to replace it," if can_resume else "--force to replace it"
    raise OutputError(f"{what}; pass {choices} or choose a new {option}")


def prepare_output_dir(path: str | os.PathLike, *, folder: bool = False, keep: bool = True) -> None:
    """Create the folder an output goes into (``path`` itself when ``folder``, else its parent) and prove that it
    takes a file (a temporary one, removed at once), so a read-only or uncreatable place fails in one line
    (`OutputError`) before any work is done, not after it. ``keep=False`` removes again the folders it created
    (for a command that may still refuse before writing anything)."""
    import tempfile

    path = os.fspath(path)
    target = os.path.abspath(path if folder else (os.path.dirname(path) or "."))
    created, ok = [], False
    p = target
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        created.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.TemporaryFile(dir=target, prefix=".toolkit-probe-"):
            pass
        ok = True
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if not (keep and ok):  # a failed attempt leaves no half-made folders either
            for d in created:  # innermost first
                try:
                    os.rmdir(d)
                except OSError:
                    pass
