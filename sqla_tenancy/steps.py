"""The named steps of provisioning, and the hook fault-injection tests use to fail any of them."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

__all__ = ["Steps"]

#: The step the current thread (or task) last entered, for error messages.
_current: ContextVar[str | None] = ContextVar("sqla_tenancy_step", default=None)


class Steps:
    """Called with each provisioning step's name (``steps("database")``) before the step runs.

    ``injector``, when set, is called with the name and may raise: the test-suite fails every step
    in turn this way and checks that nothing is left behind.
    """

    __slots__ = ("injector", "observer")

    def __init__(self) -> None:
        self.injector: Callable[[str], None] | None = None
        #: called with each step's name before the step runs (the ``step`` lifecycle event);
        #: raising fails the step like the injector does
        self.observer: Callable[[str], None] | None = None

    def __call__(self, name: str) -> None:
        _current.set(name)
        if self.observer is not None:
            self.observer(name)
        if self.injector is not None:
            self.injector(name)

    @staticmethod
    def current() -> str | None:
        """The name of the step this thread (or task) last entered, on any :class:`Steps`."""
        return _current.get()
