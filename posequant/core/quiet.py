"""Third-party chatter kept out of the user's terminal unless ``posequant --verbose``.

ONNX Runtime, NNCF, OpenVINO, torch, onnxsim and libjpeg/libpng print to the process's stdout and
stderr from C and Python alike (ORT's "*** EP Error ***" banner, NNCF's rich progress bars, libjpeg's
"Premature end of JPEG file"). :func:`quiet` goes around such a call and sends all of it to a scratch
file; what matters is then said in our own words, as a :class:`PosequantWarning` (the CLI prints it
as one ``warning:`` line) or a :class:`PosequantError`.

Only for calls made from one thread at a time (the file descriptors are the process's): image decoding
in worker threads is kept quiet by checking files before decoding them instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from typing import Callable, Iterator, Sequence

from .errors import PosequantError, PosequantWarning

_state = {"verbose": False, "depth": 0}
_lock = threading.Lock()


def set_verbose(on: bool) -> None:
    """``posequant --verbose``: let the libraries print what they print."""
    _state["verbose"] = bool(on)


def is_verbose() -> bool:
    return _state["verbose"] or os.environ.get("POSEQUANT_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence a third-party call: file descriptors 1 and 2, ``sys.stdout``/``sys.stderr``, Python warnings
    and logging. With --verbose nothing is silenced (Python's stdout goes to stderr). Nested uses are one."""
    with _lock:
        outer = _state["depth"] == 0
        _state["depth"] += 1
    try:
        if not outer:
            yield
            return
        if is_verbose():
            with contextlib.redirect_stdout(sys.stderr):  # shown, but stdout stays ours (results, JSON)
                yield
            return
        with _fds_to_scratch(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(), _no_logging():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _lock:
            _state["depth"] -= 1


@contextlib.contextmanager
def _fds_to_scratch() -> Iterator[None]:
    for stream in (sys.stdout, sys.stderr):  # what we printed before goes out first
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    with tempfile.TemporaryFile() as scratch:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:  # not open (a daemon): nothing to silence
                    continue
                os.dup2(scratch.fileno(), fd)
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def _no_logging() -> Iterator[None]:
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)


@contextlib.contextmanager
def show_warnings(echo: Callable[[str], None]) -> Iterator[None]:
    """The CLI's warnings: ours as ``warning: ...`` lines through ``echo``; other libraries' only with --verbose."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", PosequantWarning)
        plain = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, PosequantWarning):
                echo(f"warning: {message}")
            elif is_verbose():  # asked when shown: --verbose is read after this is set up
                plain(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def warn(message: str) -> None:
    """A warning in our words (the CLI prints it as one ``warning:`` line)."""
    warnings.warn(message, PosequantWarning, stacklevel=2)


# ---- ONNX Runtime sessions ---------------------------------------------------------------------

CPU_ONLY = ("CPUExecutionProvider",)
_PROVIDER_NAMES = {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "CUDA",
                   "TensorrtExecutionProvider": "TensorRT", "OpenVINOExecutionProvider": "OpenVINO"}


def provider_name(provider: str) -> str:
    return _PROVIDER_NAMES.get(provider, provider.removesuffix("ExecutionProvider"))


def ort_session(model, options=None, providers: Sequence = CPU_ONLY, *, fallback: str = "warn"):
    """An ``onnxruntime.InferenceSession``, quiet. When ORT could not start a provider asked for and fell
    back to the next ("*** EP Error ***", or one not in this build), ``fallback="warn"`` says so in one
    warning; ``"error"`` refuses (a benchmark labelled cuda must not run on the CPU)."""
    import onnxruntime as ort

    opts = options if options is not None else ort.SessionOptions()
    if not is_verbose():
        opts.log_severity_level = 3  # errors only
    with quiet():
        session = ort.InferenceSession(model, opts, providers=list(providers))
    wanted = [p if isinstance(p, str) else p[0] for p in providers]
    active = session.get_providers()
    lost = [provider_name(p) for p in wanted if p not in active]
    if lost:
        now = provider_name(active[0]) if active else "nothing"
        if fallback == "error":
            raise PosequantError(f"ONNX Runtime could not start its {', '.join(lost)} provider here and would run on "
                                 f"{now} (posequant --verbose shows why): check the GPU libraries, or use --device cpu")
        warn(f"{', '.join(lost)} provider unavailable, running on {now}")
    return session
