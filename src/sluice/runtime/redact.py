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

**PII follows the data.** A column is PII when a contract marks it ``pii: true``, and so is
every column computed from one: :func:`pii_lineage` follows the pipeline's configuration —
renames, derives, SQL select lists (DuckDB's own parse of the statement, CTEs and subqueries
included), window aggregates — and the redactor treats all of them as PII (``SELECT name AS
full_name``: ``full_name`` is redacted in a dead letter's payload, in a report's samples, in
messages). Column names, step ids and type names stay readable. Without declared PII every
method returns its input unchanged (one attribute check).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from sluice.batch import REDACTED, mask_pii, redact_text
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

    def follow(self, config: Any) -> None:
        """Extend the declared PII to every column computed from a PII column in the pipeline
        ``config`` (:func:`pii_lineage`); the columns the configuration names stay readable.
        Called once the contract steps have declared their fields."""
        if not self.active:
            return
        pii, names = pii_lineage(config, self.pii)
        self.pii |= pii
        self.names |= names | pii

    def quality(self, report: dict[str, Any]) -> dict[str, Any]:
        """A contract step's quality report as the run report may hold it: the samples of every
        check on a PII column (declared PII by any contract of the run, or computed from one)
        are redacted, whichever contract made the check."""
        if not self.active or not report:
            return report
        out = copy.deepcopy(report)
        for check in out.get("checks") or []:
            name = str(check.get("check") or "")
            column = name.rsplit(".", 1)[0] if "." in name else name
            samples = check.get("samples")
            if samples and column in self.pii:
                check["samples"] = [REDACTED] * len(samples)
            if isinstance(check.get("detail"), str):
                check["detail"] = self.text(check["detail"])
        return out

    def text(self, message: str) -> str:
        """A message the runtime wrote (an error, a warning) without any record value."""
        if not self.active or not message:
            return message
        return redact_text(message, keep=self.names)

    def render(self, exc: BaseException) -> str:
        """The one rendering of an exception for reports and stderr."""
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


# ----------------------------------------------------------------------------- PII lineage


def _expression_refs(expr: str) -> set[str] | None:
    from sluice.steps.sqlengine import column_refs

    return column_refs(f"SELECT {expr} FROM input")


def _select_items(tree: Any) -> list[dict[str, Any]]:
    """Every select-list item anywhere in a parsed statement (top level, CTEs, subqueries,
    both sides of a set operation)."""
    items: list[dict[str, Any]] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "SELECT_NODE" and isinstance(node.get("select_list"), list):
                items.extend(i for i in node["select_list"] if isinstance(i, dict))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return items


def _refs_in(node: Any) -> set[str]:
    """The column names a parsed expression (and anything nested in it) refers to."""
    refs: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if n.get("class") == "COLUMN_REF" and n.get("column_names"):
                refs.add(str(n["column_names"][-1]))
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return refs


def _sql_derivations(sql: str) -> list[tuple[str, set[str]]]:
    """``(output column, columns it is computed from)`` for each select-list item of ``sql``
    (DuckDB's parse; a ``*`` keeps the names, so it adds nothing). An item without an alias
    gets the name DuckDB gives it (its expression's text)."""
    import duckdb

    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
        tree = json.loads(row[0]) if row else {"error": True}
        if tree.get("error"):
            return []
        out: list[tuple[str, set[str]]] = []
        for item in _select_items(tree.get("statements")):
            refs = _refs_in(item)
            if item.get("class") == "STAR" or not refs:
                continue
            name = item.get("alias") or ""
            if not name and item.get("class") == "COLUMN_REF":
                name = str(item["column_names"][-1])
            if not name:  # DuckDB names it after the expression's text
                one = {
                    "error": False,
                    "statements": [
                        {
                            "node": {
                                "type": "SELECT_NODE",
                                "modifiers": [],
                                "cte_map": {"map": []},
                                "select_list": [item],
                                "from_table": {
                                    "type": "EMPTY",
                                    "alias": "",
                                    "sample": None,
                                    "query_location": 18446744073709551615,
                                },
                                "where_clause": None,
                                "group_expressions": [],
                                "group_sets": [],
                                "aggregate_handling": "STANDARD_HANDLING",
                                "having": None,
                                "sample": None,
                                "qualify": None,
                            }
                        }
                    ],
                }
                try:
                    text = con.execute(
                        "SELECT json_deserialize_sql(?::JSON)", [json.dumps(one)]
                    ).fetchone()
                except duckdb.Error:
                    continue
                if not text:
                    continue
                name = str(text[0]).removeprefix("SELECT ").strip()
            out.append((name, refs))
        return out
    except duckdb.Error:
        return []
    finally:
        con.close()


def pii_lineage(config: Any, declared: Iterable[str]) -> tuple[set[str], set[str]]:
    """The columns of a pipeline that hold PII: those ``declared`` (contracts' ``pii: true``)
    and every column computed from one of them — by a rename, a derive, an SQL select-list
    item or a window aggregate — transitively (a fixpoint over every step, so the order of
    steps and CTEs does not matter; a name computed from PII anywhere is treated as PII
    everywhere, which can only redact more). Returns ``(PII columns, every column name the
    configuration defines)`` (the latter stay readable in messages)."""
    from sluice.config.models import DeriveStep, RenameStep, SqlStep, WindowStep

    derivations: list[tuple[str, set[str]]] = []
    for step in getattr(config, "steps", ()):
        if isinstance(step, RenameStep):
            derivations += [(new, {old}) for old, new in step.rename.items()]
        elif isinstance(step, DeriveStep):
            derivations += [(out, _expression_refs(e) or set()) for out, e in step.derive.items()]
        elif isinstance(step, WindowStep):
            derivations += [
                (out, _expression_refs(e) or set()) for out, e in step.aggregate.items()
            ]
        elif isinstance(step, SqlStep):
            derivations += _sql_derivations(step.sql)
    pii = set(declared)
    grew = True
    while grew:
        grew = False
        for name, refs in derivations:
            if name not in pii and refs & pii:
                pii.add(name)
                grew = True
    return pii, {name for name, _ in derivations}


__all__ = ["Redactor", "describe", "pii_lineage"]
