"""Progress of ``replay()`` and ``explain()``: rich bars in a terminal and in a notebook.

``replay()`` reports through a few hooks (``ProgressHooks``); ``RichProgress`` draws them.
In a terminal it is a rich live display on stderr, redrawn in place (where stderr is a file or
a pipe, rich prints the final state once). In Jupyter, rich's own live display needs
``ipywidgets``; instead the bars are shown with IPython's ``display(..., display_id=True)``
and updated in place at most a few times a second, which every notebook front end supports
(Jupyter, VS Code, Colab) and which stays in the saved notebook as HTML and text.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

# A notebook redraw costs a message to the front end: a few per second are enough.
_NOTEBOOK_INTERVAL = 0.25


class ProgressHooks:
    """The hooks ``replay()`` and ``explain()`` call; this base draws nothing.

    Subclass it (or write any object with these methods) to follow a replay yourself and
    pass it as ``replay(..., progress=hooks)``. The hooks are called under a lock, from the
    device workers' threads.

    Example:
        >>> class Count(ProgressHooks):
        ...     done = 0
        ...     def checkpoint_done(self, result, reused):
        ...         self.done += 1
        >>> replay("runs/exp1", progress=Count())
    """

    def start(self, checkpoints: int, batches_per_checkpoint: int | None) -> None:
        """A pass over ``checkpoints`` checkpoints begins (``replay``)."""

    def advance(self, examples: int, batches: int = 1) -> None:
        """``batches`` batches of ``examples`` examples were evaluated."""

    def checkpoint_done(self, result: dict[str, Any] | None, reused: bool) -> None:
        """A checkpoint is done; ``reused``: its stored result was still valid."""

    def checkpoint_failed(self, name: str, reason: str) -> None:
        """A checkpoint could not be evaluated; the others go on."""

    def stage(self, description: str, checkpoints: int) -> None:
        """A further pass over ``checkpoints`` checkpoints begins (``explain``)."""


class RichProgress(ProgressHooks):
    """The hooks drawn as rich bars: checkpoints, and batches with examples per second.

    A context manager: the display shows between ``__enter__`` and ``__exit__``.

    Args:
        console: the ``rich.console.Console`` to draw on (default: stderr, or the notebook).

    Example:
        >>> with RichProgress() as bars:
        ...     replay("runs/exp1", progress=bars)
    """

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console if console is not None else Console(stderr=True)
        self.notebook = self.console.is_jupyter
        self.bars = Progress(
            TextColumn("{task.description:<13}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=not self.notebook,
        )
        self.checkpoints = None
        self.batches = None
        self.examples = 0
        self.started = time.perf_counter()
        self._handle = None
        self._shown = 0.0

    def __enter__(self):
        if self.notebook:
            from IPython.display import display

            self._handle = display(self._table(), display_id=True)
        else:
            self.bars.start()
        return self

    def __exit__(self, *exc):
        if self.notebook:
            self._show(force=True)
        else:
            self.bars.stop()

    def start(self, checkpoints: int, batches_per_checkpoint: int | None) -> None:
        self.started = time.perf_counter()
        self.examples = 0
        self.checkpoints = self.bars.add_task("checkpoints", total=checkpoints, rate="")
        if batches_per_checkpoint is not None:
            self.batches = self.bars.add_task("batches", total=batches_per_checkpoint, rate="")
        self._show()

    def stage(self, description: str, checkpoints: int) -> None:
        if self.batches is not None:
            self.bars.update(self.batches, visible=False)
        self.batches = None
        self.checkpoints = self.bars.add_task(description, total=checkpoints, rate="")
        self._show(force=True)

    def advance(self, examples: int, batches: int = 1) -> None:
        if self.batches is None:
            return
        self.examples += examples
        rate = self.examples / max(time.perf_counter() - self.started, 1e-9)
        if self.bars.tasks[self.batches].finished:  # a new checkpoint (or group) begins
            self.bars.reset(self.batches, rate=self.bars.tasks[self.batches].fields["rate"])
        self.bars.update(self.batches, advance=batches, rate=f"{rate:,.0f} examples/s")
        self._show()

    def checkpoint_done(self, result: dict[str, Any] | None, reused: bool) -> None:
        if self.checkpoints is None:
            return
        # The batches bar starts again at the next checkpoint's first batch (``advance``),
        # so the last one's full bar stays, with the final rate.
        self.bars.update(self.checkpoints, advance=1)
        self._show()

    def checkpoint_failed(self, name: str, reason: str) -> None:
        if self.checkpoints is not None:
            self.bars.update(self.checkpoints, advance=1)
        if self.batches is not None:  # the next checkpoint starts from an empty bar
            self.bars.reset(self.batches, rate=self.bars.tasks[self.batches].fields["rate"])
        self.console.print(f"[red]{name}[/red]: {' '.join(reason.split())}")
        self._show()

    def _table(self):
        # A rich Table renders itself as HTML in a notebook (rich's JupyterMixin).
        return self.bars.make_tasks_table(self.bars.tasks)

    def _show(self, force: bool = False) -> None:
        if self._handle is None:
            return  # a terminal: rich's own refresh thread redraws
        now = time.perf_counter()
        if force or now - self._shown >= _NOTEBOOK_INTERVAL:
            self._shown = now
            self._handle.update(self._table())


def progress_display(progress: bool | ProgressHooks | None) -> AbstractContextManager:
    """The display a ``progress`` argument asks for, as a context manager yielding the hooks.

    Args:
        progress: True for ``RichProgress`` (a terminal or a notebook), False or None for no
            display, or an object with the ``ProgressHooks`` methods, used as it is.

    Returns:
        A context manager whose value has the ``ProgressHooks`` methods.

    Example:
        >>> with progress_display(True) as hooks:
        ...     hooks.start(3, None)
    """
    if progress is True:
        return RichProgress()
    if progress is False or progress is None:
        return nullcontext(ProgressHooks())
    return nullcontext(progress)
