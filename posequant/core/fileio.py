"""Writing outputs safely: checked before the work, never onto an input, complete or absent.

* :func:`check_outputs` is called by every command (and library entry point) before its first
  expensive step: each output must be creatable, must not be a special file, and must not be
  (by path, symlink or hard link) one of the command's inputs or a file inside an input folder.
* :func:`atomic_path` writes beside the target and renames it into place. A symlink is written
  through (its target is replaced, the link stays); the file gets the mode a plain ``open()``
  would give it (``0666 & ~umask``), or keeps the mode of the file it replaces; an ``OSError``
  (ENOSPC, EROFS, EACCES, ...) becomes one :class:`PosequantError` line and no temp file is left.
* ``-`` means standard output where a command allows it (the ``--json`` options).
* :func:`terminate_cleanly` makes SIGTERM (what CI runners and ``timeout`` send) unwind like Ctrl-C while a
  temporary file or folder of ours exists (:func:`atomic_path`, :func:`temp_dir`, a command of the CLI),
  so the blocks that made them remove them: no ``*.tmp`` file or temporary folder is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .errors import PosequantError

STDOUT = "-"
PathLike = str | os.PathLike



def read_head(path: PathLike, what: str, expected: str, error: type[PosequantError] = PosequantError,
              size: int = 8) -> bytes:
    """The first ``size`` bytes of an input file, after one-line errors for what is not one: missing, a
    directory, not a regular file, unreadable, empty. ``what`` names it (``model``), ``expected`` says
    what to give instead (``.onnx file``)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} not found: check the path")
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file: give the {expected} inside it")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file: give a {expected}")
    try:
        with path.open("rb") as f:
            head = f.read(size)
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e}): check its permissions") from None
    if not head:
        raise error(f"{what} {path} is empty (0 bytes): the export, save or download did not finish; redo it")
    return head

def _named(option: str | None, path: PathLike) -> str:
    return f"{option} {path}" if option else str(path)


def _umask() -> int:
    try:  # Linux: read it, without the set-and-restore dance that races other threads' files
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """What ``open(path, "w")`` would create: 0666 minus the umask."""
    return 0o666 & ~_umask()


def check_writable(path: PathLike, option: str | None = "-o", *, allow_stdout: bool = False) -> Path:
    """Fail early (before hours of work) if ``path`` cannot be written; ``option`` names it in messages."""
    if str(path) == STDOUT:
        if allow_stdout:
            return Path(STDOUT)
        raise PosequantError(f"{_named(option, path)}: standard output is only for --json; give a file name")
    given = Path(path)
    target = Path(os.path.realpath(given))  # a symlink is written through to its target
    shown = _named(option, given)
    hint = " (use - for standard output)" if allow_stdout else ""
    if os.path.abspath(given).startswith(("/dev/", "/proc/")):  # /dev/stdout: replacing what it points to loses output
        raise PosequantError(f"{shown} is a special file (pipe, device or socket), not a regular file: "
                             f"give a file name{hint}")
    if given.is_dir():
        raise PosequantError(f"{shown} is a directory: give a file name, e.g. {given / 'out'}")
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise PosequantError(f"cannot check {shown} ({e.strerror}): choose another {option or 'path'}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise PosequantError(f"{shown} is a special file (pipe, device or socket), not a regular file: "
                             f"give a file name{hint}")
    parent = target.parent
    if not parent.is_dir():
        raise PosequantError(f"the folder of {shown} ({parent}) does not exist: create it or choose another "
                             f"{option or 'path'}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PosequantError(f"cannot write {shown}: no permission to write in {parent}; choose another "
                             f"{option or 'path'}")
    return given


def check_output_dir(path: PathLike, option: str | None = "-o") -> Path:
    """An output folder: either an existing folder we may write in, or creatable (its parent exists)."""
    given = Path(path)
    shown = _named(option, given)
    if str(path) == STDOUT:
        raise PosequantError(f"{shown}: standard output is only for --json; give a folder")
    if given.exists() and not given.is_dir():
        raise PosequantError(f"{shown} is a file: give a folder")
    if given.is_dir():
        if not os.access(given, os.W_OK | os.X_OK):
            raise PosequantError(f"cannot write in {shown}: permission denied; choose another {option or 'folder'}")
        return given
    parent = Path(os.path.realpath(given)).parent
    while not parent.exists() and parent != parent.parent:  # parents=True creates the missing ones
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PosequantError(f"cannot create {shown}: no permission to write in {parent}; choose another "
                             f"{option or 'folder'}")
    return given


def arch_file(arch: str | None) -> Path | None:
    """The file of an ``--arch FILE.py:fn`` spec (an input too), or None."""
    if arch and ".py:" in arch:
        return Path(arch.rsplit(":", 1)[0])
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _same_file_under(folder: str, ident: tuple[int, int]) -> str | None:
    """A file in ``folder`` (recursively) that is the same inode as ``ident``: a hard link into it."""
    for dirpath, _dirs, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            if _identity(Path(p)) == ident:
                return p
    return None


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None], *,
                  stdout_ok: Iterable[str] = ()) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an input.

    ``outputs`` maps the option that names an output (``-o``, ``--json``, ...) to a file path;
    keys ending in ``/`` name output folders (``--report/``), mapped to the files the command will
    write there. ``inputs`` maps what names an input (``MODEL``, ``--data``) to a file or a folder;
    a model input counts with all of its files (``posequant.core.modelfiles``: external data, an
    IR's .bin, an engine's .json). An output is refused when it resolves (realpath, or the same
    inode: a hard link) to an input file, to an existing file inside an input folder, or to
    another output.
    """
    stdout_ok = set(stdout_ok)
    files: list[tuple[str, Path]] = []
    for option, value in outputs.items():
        if value is None:
            continue
        if option.endswith("/"):  # an output folder: the folder, then what the command writes in it
            folder, names = value
            check_output_dir(folder, option[:-1])
            files += [(option[:-1], Path(folder) / n) for n in names]
            continue
        if str(value) == STDOUT and option in stdout_ok:
            continue
        check_writable(value, option, allow_stdout=option in stdout_ok)
        files.append((option, Path(value)))

    ins = [(name, Path(p)) for name, p in inputs.items() if p is not None and Path(p).exists()]
    # a model is all of its files: an ONNX model's external data, an IR's .bin, an engine's .json
    from .modelfiles import companion_files

    ins += [(f"{name} ({what})", p) for name, src in list(ins) if src.is_file()
            for what, p in companion_files(src) if p.exists()]
    seen: dict[str, str] = {}
    for option, out in files:
        real = os.path.realpath(out)
        ident = _identity(out)
        if real in seen:
            raise PosequantError(f"{option} {out} and {seen[real]} are the same file: give each output its own path")
        seen[real] = f"{option} {out}"
        for name, src in ins:
            src_real = os.path.realpath(src)
            if src.is_dir():
                clash = None
                if _inside(real, src_real) and os.path.isfile(real):
                    clash = real
                elif ident is not None and os.stat(out).st_nlink > 1:
                    clash = _same_file_under(src_real, ident)
                if clash:
                    raise PosequantError(f"{option} {out} would overwrite {clash}, a file of the input {name} "
                                         f"{src}: choose another {option}")
            elif real == src_real or (ident is not None and ident == _identity(src)):
                raise PosequantError(f"{option} {out} is the input {name} {src}: writing it would destroy the "
                                     f"input; choose another {option.split(' (')[0]}")


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM: raised where it was, so temporary files are removed as for Ctrl-C (a
    KeyboardInterrupt, so that code which lets Ctrl-C through lets this through too)."""


_term = {"depth": 0, "installed": False, "raised": False}
_term_lock = threading.Lock()


def _on_sigterm(signum, frame) -> None:
    if _term["raised"]:  # a second SIGTERM must not cut the clean-up of the first short
        return
    _term["raised"] = True
    raise Terminated(f"terminated (signal {signum})")


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Within this block (nested uses are one), SIGTERM raises :class:`Terminated` instead of ending the process
    on the spot. Only when SIGTERM still has its default action and only in the main thread (where Python runs
    signal handlers): a program's own SIGTERM handler is left alone."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread runs signal handlers
        yield
        return
    with _term_lock:
        outer = _term["depth"] == 0
        _term["depth"] += 1
        if outer and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _term.update(installed=True, raised=False)
    try:
        yield
    finally:
        with _term_lock:
            _term["depth"] -= 1
            if _term["depth"] == 0 and _term["installed"]:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _term["installed"] = False


@contextlib.contextmanager
def temp_dir(prefix: str = "posequant.", dir: PathLike | None = None) -> Iterator[Path]:
    """A temporary folder, removed with everything in it when the block ends: normally, on an error, on Ctrl-C
    and on SIGTERM (:func:`terminate_cleanly`)."""
    with terminate_cleanly():
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def write_error(option: str | None, path: PathLike, e: OSError) -> PosequantError:
    """The one line for an output that could not be written: which, and the OS's reason."""
    reason = e.strerror or str(e)
    return PosequantError(f"cannot write {_named(option, path)}: {reason}; nothing was written there "
                          f"(free space or choose another {option or 'path'})")



def write_problem(folder: PathLike, nbytes: int) -> OSError | None:
    """Why ``nbytes`` cannot be written in ``folder`` (the ``OSError`` a write there gets: ENOSPC, EFBIG, EDQUOT,
    EROFS, ...), or None when they can. For writers that hide the reason (OpenVINO's C++ streams say
    "basic_ios::clear: iostream error"): the same write again, from Python, then removed."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".posequant-space.", dir=folder)
    except OSError as e:
        return e
    try:
        with os.fdopen(fd, "wb") as f:
            chunk, left = b"\0" * min(nbytes, 1 << 20), nbytes
            while left > 0:
                f.write(chunk[:left])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None


@contextlib.contextmanager
def atomic_path(path: PathLike, option: str | None = "-o") -> Iterator[Path]:
    """Yield a temporary path beside ``path``'s target; move it into place only if the block succeeds.

    Symlinks are written through (the link stays, its target is replaced). The new file gets the
    replaced file's mode, or ``0666 & ~umask`` when there was none.
    """
    check_writable(path, option)
    target = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = new_file_mode()
    with terminate_cleanly():
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
        except OSError as e:
            raise write_error(option, path, e) from None
        tmp = Path(tmp)
        try:
            os.chmod(tmp, mode)
            yield tmp
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error(option, path, e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class StdoutError(PosequantError):
    """Standard output cannot be written (a full device, a closed pipe)."""

    @classmethod
    def of(cls, e: OSError) -> "StdoutError":
        return cls(f"cannot write to standard output: {e.strerror or e}; redirect it elsewhere")


def write_stdout(data: bytes | str) -> None:
    """``data`` on standard output, after what was printed before; :class:`StdoutError` when it cannot take it."""
    try:
        sys.stdout.flush()
        if isinstance(data, str):  # text as text: a notebook's stdout has no binary buffer
            sys.stdout.write(data)
        else:
            sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except OSError as e:
        raise StdoutError.of(e) from None


def write_bytes_atomic(path: PathLike, data: bytes, option: str | None = "-o") -> Path:
    """Write ``data`` to ``path`` atomically; ``-`` writes it to standard output."""
    if str(path) == STDOUT:
        write_stdout(data)
        return Path(STDOUT)
    with atomic_path(path, option) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, option: str | None = "-o") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``-`` writes it to standard output."""
    if str(path) == STDOUT:
        write_stdout(text)
        return Path(STDOUT)
    return write_bytes_atomic(path, text.encode("utf-8"), option)


@contextlib.contextmanager
def output_dir(path: PathLike, option: str | None = "-o") -> Iterator[Path]:
    """Create the folder ``path`` (0777 & ~umask, parents too); if the block fails (SIGTERM included) and the
    folders we made are still empty, remove them again: a failed run leaves no empty output folder behind."""
    path = Path(path)
    check_output_dir(path, option)
    made = []
    p = path
    while not p.exists():
        made.append(p)
        p = p.parent
    with terminate_cleanly():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PosequantError(f"cannot create {_named(option, path)} ({e.strerror}): choose another "
                                 f"{option or 'folder'}") from None
        try:
            yield path
        except BaseException:
            for d in made:  # innermost first
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
            raise
