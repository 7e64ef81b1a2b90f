"""Data contracts: the model, checks compiled to Polars expressions, the contract step, ODCS."""

from sluice.quality.contract import Contract, FieldSpec, load_contract

__all__ = ["Contract", "FieldSpec", "load_contract"]
