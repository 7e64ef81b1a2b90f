"""File formats: readers (csv, json, jsonl, parquet, xml) and atomic writers."""
