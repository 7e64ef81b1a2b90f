"""Every error Sluice raises, in one tree.

::

    SluiceError                      root: catch this to catch everything from Sluice
    ├── ConfigError                  a setting is wrong (names the step, the value, the fix)
    │   └── ConfigErrors             several ConfigErrors reported at once (``sluice validate``)
    ├── MissingDependencyError       an optional extra is not installed (says which ``pip install``)
    ├── StepError                    a step failed while running (carries ``step_id``)
    │   ├── TransientError           worth retrying with backoff (network blip, lock timeout)
    │   └── TerminalError            retrying will not help: the record/batch becomes a dead letter
    ├── SourceError                  a source could not be opened or read
    └── SinkError                    a sink could not be opened, written or committed

Third-party exceptions are converted at the connector boundary with ``raise ... from exc`` so the
original cause stays visible in the traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class SluiceError(Exception):
    """Root of every error raised by Sluice."""


#: What a configured node is, as messages name it: ``source 'orders'``, ``sink 'lake'``.
ROLES = ("source", "step", "sink")


class ConfigError(SluiceError):
    """A configuration mistake: names the node (its role and id), the field, the offending value
    and the fix.

    ``role`` is ``"source"``, ``"step"`` or ``"sink"``; left ``None`` by a component that does
    not know its role, it is filled in by whoever builds the component
    (:func:`sluice.config.validate.build_components`) and defaults to ``"step"``. The text is
    rendered when the error is shown, so such late corrections are reflected.
    """

    def __init__(
        self,
        message: str,
        *,
        step_id: str | None = None,
        field: str | None = None,
        value: object = None,
        fix: str | None = None,
        role: str | None = None,
    ) -> None:
        self.step_id = step_id
        self.field = field
        self.value = value
        self.fix = fix
        self.message = message
        self.role = role
        super().__init__(message)

    def __str__(self) -> str:
        return self._render()

    def _render(self) -> str:
        where = f"{self.role or 'step'} '{self.step_id}'" if self.step_id else "pipeline"
        if self.field:
            where += f", field '{self.field}'"
        text = f"{where}: {self.message}"
        if self.value is not None:
            text += f" (got {_short(self.value)})"
        if self.fix:
            text += f". Fix: {self.fix}"
        return text


class ConfigErrors(ConfigError):
    """Many configuration mistakes, reported together (nested ``ConfigErrors`` are flattened)."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        flat: list[ConfigError] = []
        for e in errors:
            flat.extend(e.errors if isinstance(e, ConfigErrors) else [e])
        self.errors: list[ConfigError] = flat
        Exception.__init__(self, f"{len(flat)} problem(s) in the pipeline")
        self.step_id = None
        self.field = None
        self.value = None
        self.fix = None
        self.role = None
        self.message = f"{len(flat)} problem(s) in the pipeline:"

    def _render(self) -> str:
        return "\n".join([self.message, *(f"  - {e}" for e in self.errors)])


def _short(value: object, limit: int = 200) -> str:
    """``repr`` of an offending value, cut to ``limit`` characters (a pasted file is no help)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-3:]}"


class MissingDependencyError(SluiceError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package, which is not installed. "
            f"Fix: pip install 'sluice[{extra}]'"
        )


class StepError(SluiceError):
    """A step failed at run time. The message names the node by its role: ``step 'x'``,
    ``source 'x'`` (:class:`SourceError`) or ``sink 'x'`` (:class:`SinkError`)."""

    role = "step"  # a runtime that knows better (an error raised by a sink) may set it

    def __init__(self, step_id: str, message: str, *, fix: str | None = None) -> None:
        self.step_id = step_id
        self.fix = fix
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        text = f"{self.role} '{self.step_id}': {self.message}"
        if self.fix:
            text += f". Fix: {self.fix}"
        return text


class TransientError(StepError):
    """A failure that may succeed when retried (with exponential backoff and jitter)."""


class TerminalError(StepError):
    """A failure that retrying will not fix; the affected records become dead letters."""


class SourceError(StepError):
    """A source could not be opened or read."""

    role = "source"


class SinkError(StepError):
    """A sink could not be opened, written or committed."""

    role = "sink"


def require(package: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``package`` can be imported."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise MissingDependencyError(package, extra, feature)
