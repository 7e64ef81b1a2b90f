"""The one place a run renders its errors and messages: :class:`Redactor`.

When a pipeline declares PII (a contract field with ``pii: true``), no dead letter, run report,
error or line the runtime prints may hold a value of a record. Third-party messages quote
values freely (``Could not convert string 'x@y.z' to INT32``, a parser appending the raw line),
so every message that leaves a run goes through the run's :class:`Redactor`:

* dead letters: :meth:`Redactor.dead_letters` (PII keys of JSON payloads redacted, raw
  payloads redacted whole, messages of non-contract steps stripped of the record's values, of
  quoted literals and of raw record text: :func:`sluice.batch.redact_text`);
* the run's error: :meth:`Redactor.render` gives the text for the report and for stderr, and
  :meth:`Redactor.scrub` rewrites the exception the run raises (and its causes) in place, so
  that whoever prints it later (``sluice run``, a user's ``except``) prints the redacted text;
* anything the runtime prints to stderr: :meth:`Redactor.warn`.

Column names, step ids and type names stay readable. Without declared PII every method
returns its input unchanged (one attribute check).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import pyarrow as pa

from sluice.batch import mask_pii, redact_text
from sluice.errors import ConfigError, SluiceError


def describe(exc: BaseException) -> str:
    """An exception as one line: Sluice errors as they are, others with their type."""
    if isinstance(exc, SluiceError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


class Redactor:
    """Holds what a run knows about PII and renders every message through it."""

    def __init__(self) -> None:
        #: fields declared PII by the pipeline's contracts
        self.pii: set[str] = set()
        #: contract steps: their messages never hold PII values (the contract engine masks them)
        self.trusted: set[str] = set()
        #: names kept readable inside quotes: columns, step ids
        self.names: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.pii)

    def declare(self, step_id: str, fields: Iterable[str]) -> None:
        """A contract step declares PII fields (called when the step is opened)."""
        fields = set(fields)
        if fields:
            self.pii |= fields
            self.trusted.add(step_id)
            self.names |= fields

    def learn(self, names: Iterable[str]) -> None:
        """Column names and step ids seen in the run stay readable in messages."""
        self.names.update(names)

    def text(self, message: str) -> str:
        """A message the runtime wrote (an error, a warning) without any record value."""
        if not self.active or not message:
            return message
        return redact_text(message, keep=self.names)

    def render(self, exc: BaseException) -> str:
        """``render_error``: the one rendering of an exception for reports and stderr."""
        return self.text(describe(exc))

    def scrub(self, exc: BaseException) -> None:
        """Rewrite ``exc`` (and the exceptions it was raised from) in place so that ``str``
        gives the redacted text, wherever it is printed later. A no-op without PII."""
        if not self.active:
            return
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            try:
                text = str(current)
            except Exception:  # an exception whose __str__ fails: say nothing of it
                text = type(current).__name__
            clean = self.text(text)
            if clean != text:
                current.args = (clean,)
                # errors that render from their parts (StepError, ConfigError): clean each part
                for part in ("message", "fix"):
                    value = getattr(current, part, None)
                    if isinstance(value, str):
                        setattr(current, part, self.text(value))
                if isinstance(current, ConfigError):
                    current.value = None
            current = current.__cause__ or current.__context__

    def dead_letters(self, table: pa.Table) -> pa.Table:
        """Dead letters as they may be written (see :func:`sluice.batch.mask_pii`)."""
        if not self.active or table.num_rows == 0:
            return table
        return mask_pii(table, self.pii, trusted_steps=self.trusted, keep=self.names)

    def warn(self, message: str) -> None:
        """Print a runtime warning to stderr (``sluice: ...``), redacted."""
        print(f"sluice: {self.text(message)}", file=sys.stderr)


def render_error(exc: BaseException, redactor: Redactor | None = None) -> str:
    """Render an exception for a person: through the run's redactor when there is one."""
    return redactor.render(exc) if redactor is not None else describe(exc)


__all__ = ["Redactor", "describe", "render_error"]
