"""The named steps of provisioning, and the hook fault-injection tests use to fail any of them."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Steps"]


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
        if self.observer is not None:
            self.observer(name)
        if self.injector is not None:
            self.injector(name)
