"""The ``contract`` step: enforce a data contract inside a pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sluice.batch import Frame, as_polars
from sluice.config.models import ContractStep
from sluice.plugins import RunContext, StepResult
from sluice.quality.contract import Contract, load_contract
from sluice.quality.engine import CheckResult, ContractChecker, ContractFailure
from sluice.steps._base import BaseStep


class ContractCheck(BaseStep):
    """Row checks per batch (failing rows: dead letter / drop / warn / fail, per check); dataset
    rules at the end of input, where a failed gate with ``action: fail`` stops the run (the data
    sinks then roll back, the dead letters stay). Results go into the run report under
    ``quality.<step id>``."""

    config: ContractStep

    def __init__(self, config: ContractStep, *, report_only: bool = False) -> None:
        """``report_only``: count every check and stop for none (``sluice check``): see
        :class:`ContractChecker`."""
        super().__init__(config)
        self._report_only = report_only
        self.checker: ContractChecker | None = None
        self.gates: list[CheckResult] = []
        if isinstance(config.contract, Contract):
            self.contract: Contract | None = config.contract
            self.checker = ContractChecker(
                config.contract, step_id=config.id, report_only=report_only
            )
        else:
            self.contract = None

    @property
    def report_only(self) -> bool:
        """Count every check and stop for none (``sluice check``)."""
        return self._report_only

    @report_only.setter
    def report_only(self, value: bool) -> None:
        self._report_only = value
        if self.checker is not None:
            self.checker.report_only = value

    @property
    def pii_fields(self) -> set[str]:
        return self.contract.pii if self.contract else set()

    def open(self, ctx: RunContext) -> None:
        super().open(ctx)
        if self.checker is None:
            path = ctx.resolve(str(self.config.contract))
            self.contract = load_contract(path, step_id=self.step_id)
            self.checker = ContractChecker(
                self.contract, step_id=self.step_id, report_only=self._report_only
            )
        self.checker.open(ctx)

    def process(self, table: Frame) -> StepResult:
        assert self.checker is not None, "open() first"
        outcome = self.checker.check(as_polars(table))
        return StepResult(outcome.table, dead=outcome.dead, filtered=outcome.dropped)

    def finish(self) -> StepResult | None:
        assert self.checker is not None and self.contract is not None
        self.gates = self.checker.finish()
        failed = [g for g in self.gates if g.failed and g.action == "fail"]
        if failed and not self._report_only:
            detail = "; ".join(f"{g.name} ({g.detail})" for g in failed)
            raise ContractFailure(
                self.step_id,
                f"contract '{self.contract.name}': quality gate(s) failed: {detail}",
                fix="fix the data or the threshold; set the rule's action: warn to report only",
            )
        return None

    def quality_report(self) -> dict[str, Any]:
        if self.checker is None or self.contract is None:
            return {}
        return {
            "contract": self.contract.name,
            "version": self.contract.version,
            "checks": [r.to_dict() for r in self.checker.results.values()],
            "gates": [g.to_dict() for g in self.gates],
            "schema": self.checker.schema_notes,
        }

    def _key_stores(self) -> dict[str, dict[str, Any]]:
        assert self.checker is not None, "open() first"
        return {"seen": self.checker.seen, "repeated": self.checker.repeated}

    def use_key_store(self, make: Callable[[str], Any]) -> None:
        """Stream mode with ``checkpoint.backend: rocksdb``: keep ``unique`` keys in that store."""
        for kind, stores in self._key_stores().items():
            for name in list(stores):
                stores[name].close()
                stores[name] = make(f"{kind}-{name}")

    def snapshot(self) -> dict[str, pa.Table]:
        """Stream checkpoints: the keys seen by each ``unique`` check, and those seen twice."""
        return {
            f"{kind}:{name}": store.snapshot()
            for kind, stores in self._key_stores().items()
            for name, store in stores.items()
        }

    def restore(self, state: dict[str, pa.Table]) -> None:
        assert self.checker is not None
        for kind, stores in self._key_stores().items():
            for name, store in stores.items():
                table = state.get(f"{kind}:{name}")
                if table is not None:
                    store.restore(table)
        for name, repeated in self.checker.repeated.items():
            self.checker.results[f"{name}.unique"].duplicated_values = repeated.count

    def close(self) -> None:
        if self.checker is not None:
            self.checker.close()
