"""Frozen pydantic models for every setting: pipeline, sources, steps, sinks, dead letters.

YAML loading, the Python builder, ``sluice validate`` and ``sluice schema`` all come from these
models, so a setting is declared exactly once.
"""

from __future__ import annotations

import codecs
import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sluice.quality.contract import Contract
from sluice.types import parse_type


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _check_types(v: dict[str, str] | None) -> dict[str, str] | None:
    for col, name in (v or {}).items():
        try:
            parse_type(name)
        except ValueError as exc:
            raise ValueError(f"column {col!r}: {exc}") from None
    return v


# --------------------------------------------------------------------------------------- sources


class FileSourceBase(Model):
    id: str = Field("source", description="Step id of the source (used in dead letters).")
    path: str = Field(description="A file, or a glob of files of one format (e.g. data/*.csv).")
    columns: dict[str, str] | None = Field(
        None,
        alias="schema",
        description="Explicit column types {name: type}; columns not listed are inferred.",
    )

    watch: bool = Field(
        False,
        description="Stream mode: keep watching the folder; each new file matching the glob is "
        "read exactly once as it lands (write it elsewhere and rename it in).",
    )
    poll_interval: str | float = Field(
        "1s", description="With watch: how often the folder is listed for new files."
    )

    on_unreadable: Literal["dead_letter", "fail"] = Field(
        "dead_letter",
        description="A matched file that vanished or cannot be read: a file_unreadable dead "
        "letter (the run goes on), or fail the run.",
    )

    _types = field_validator("columns")(classmethod(lambda cls, v: _check_types(v)))


class TextSourceBase(FileSourceBase):
    """Settings of the text formats (CSV, JSON, JSON lines, XML): compression and limits."""

    compression: Literal["auto", "none", "gzip", "bz2", "zstd", "xz", "lz4"] = Field(
        "auto",
        description="auto: recognise gzip, bzip2, zstd, xz and LZ4 files by their first bytes.",
    )
    max_record_bytes: int = Field(
        64 << 20,
        ge=1 << 10,
        le=1 << 31,
        description="A longer record (line, row, document) is a too_large dead letter and "
        "reading goes on with the next one; memory stays bounded.",
    )
    max_file_bytes: int | None = Field(
        None,
        ge=1,
        description="Refuse (too_large dead letter) a file whose (decompressed) content is "
        "larger; none by default.",
    )
    max_compression_ratio: float | None = Field(
        1000.0,
        ge=1,
        description="A compressed file may expand to at most this many times its size (past the "
        "first 64 MiB): a decompression bomb becomes a too_large dead letter.",
    )


class FixableValueError(ValueError):
    """A validator's error that also names the fix (the loader puts it in ConfigError.fix)."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def _csv_char(v: str | None, what: str, *, others: dict[str, str | None]) -> str | None:
    """One ASCII character (pyarrow's CSV parser works on single bytes), not a line break and
    different from the other special characters already given."""
    if v is None:
        return None
    if len(v) != 1 or not v.isascii():
        hint = ' (a tab is "\\t" in double quotes in YAML)' if v in ("\\t", "tab") else ""
        raise FixableValueError(
            f"the {what} must be exactly one ASCII character, got {len(v)} character(s)"
            + ("" if v.isascii() else ", not ASCII"),
            f"use a single ASCII character such as ',' ';' '|' or a tab{hint}; a multi-byte "
            "or multi-character separator is not supported: convert the file first",
        )
    if v in "\r\n":
        raise FixableValueError(
            f"the {what} cannot be a line break", f"choose another character for the {what}"
        )
    for name, other in others.items():
        if other is not None and v == other:
            raise FixableValueError(
                f"the {what} {v!r} is also the {name}",
                f"give the {what} and the {name} different characters",
            )
    return v


class CsvSource(TextSourceBase):
    """CSV files. Each record that cannot become a row is its own dead letter (wrong field count,
    bytes invalid in the encoding, a value that does not convert, a stray quote, a quoted field cut
    by the end of the file, a record over max_record_bytes); the rest of the file is read."""

    kind: Literal["csv"]
    delimiter: str = Field(",", description="The field separator: one ASCII character.")
    quote: str | None = Field(
        '"',
        description="Quote character (one ASCII character); null disables quoting.",
        validate_default=True,
    )
    escape: str | None = Field(
        None,
        description="Escape character: the next character is literal, inside quotes or not. "
        "Null (default) or the quote character itself: a quote inside a quoted field is "
        "written doubled.",
    )
    comment: str | None = Field(
        None,
        description="Lines starting with this character are skipped (counted as skipped).",
    )
    skip_rows: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Lines skipped at the start of each file, before the header (counted as "
        "skipped).",
    )
    header: bool = Field(True, description="The first record holds the column names.")
    column_names: list[str] | None = Field(
        None,
        description="Column names of a file without a header (header: false); without them the "
        "columns are f0, f1, ...",
    )
    encoding: str = Field(
        "utf-8", description="Any Python text codec: utf-8, latin-1, utf-16, cp1252..."
    )
    infer_types: bool = Field(
        True,
        description="Infer numbers/booleans/dates/timestamps from the whole file (a column "
        "takes a type only if every value of the file fits it); false = strings.",
    )
    null_values: list[str] = Field(
        default_factory=lambda: [""],
        description="Values read as null (quoted or not); the default: empty fields.",
    )
    trim_spaces: bool = Field(
        False,
        description="Remove spaces and tabs around every value (and header name) before "
        "null_values and types apply. Without it, numbers and dates still allow surrounding "
        "spaces, and strings keep them.",
    )
    strict_quotes: bool = Field(
        True,
        description="A quote inside an unquoted field, or text after a closing quote, makes "
        "the record an unquoted_value dead letter; false: such quotes are kept as text.",
    )
    block_size: int = Field(8 << 20, ge=1 << 12, le=1 << 30, description="Bytes parsed per batch.")

    @model_validator(mode="before")
    @classmethod
    def _no_line_limit(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_line_bytes" in data:
            raise FixableValueError(
                "max_line_bytes is not a CSV option: a CSV record may span several lines "
                "inside quotes, and max_record_bytes limits the whole record",
                "write max_record_bytes instead (a longer record is a too_large dead letter)",
            )
        return data

    @field_validator("delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        out = _csv_char(v, "delimiter", others={})
        assert out is not None
        return out

    @field_validator("quote")
    @classmethod
    def _quote(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _csv_char(v, "quote", others={"delimiter": info.data.get("delimiter")})

    @field_validator("escape")
    @classmethod
    def _escape(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and v == info.data.get("quote"):
            return None  # "escape the quote with a quote" is quote doubling, the default
        return _csv_char(v, "escape", others={"delimiter": info.data.get("delimiter")})

    @field_validator("comment")
    @classmethod
    def _comment(cls, v: str | None, info: ValidationInfo) -> str | None:
        others = {k: info.data.get(k) for k in ("delimiter", "quote", "escape")}
        return _csv_char(v, "comment character", others=others)

    @field_validator("column_names")
    @classmethod
    def _column_names(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return None
        if info.data.get("header", True):
            raise FixableValueError(
                "column_names is for files without a header, but header is true",
                "set header: false (and skip_rows: 1 to drop a header line you want to "
                "replace), or rename columns with a rename step",
            )
        seen: set[str] = set()
        for name in v:
            if not name:
                raise FixableValueError("a column name is empty", "give every column a name")
            if name in seen:
                raise FixableValueError(
                    f"the column name {name!r} appears twice", "give every column its own name"
                )
            seen.add(name)
        missing = [k for k in info.data.get("columns") or {} if k not in seen]
        if missing:
            raise FixableValueError(
                f"the schema declares {missing} but column_names has no such column",
                "; ".join(did_you_mean(k, v) for k in missing),
            )
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            info = codecs.lookup(v)
        except LookupError:
            info = None
        if info is None or not getattr(info, "_is_text_encoding", True):
            raise FixableValueError(
                f"unknown text encoding {v!r}",
                "use a Python codec name such as utf-8, latin-1, cp1252 or utf-16",
            )
        return v


def did_you_mean(name: str, names: list[str]) -> str:
    """A hint for a column name that is not among ``names``."""
    exact = [n for n in names if n.strip().casefold() == name.strip().casefold()]
    close = exact or difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"{name!r}: did you mean {close[0]!r}?"
    return f"{name!r}: the columns are {names}"


class JsonSource(TextSourceBase):
    """A JSON document per file: an array of objects (one row each) or a single object."""

    kind: Literal["json"]
    max_bytes: int = Field(1 << 30, description="Files larger than this are refused (dead letter).")


class JsonlSource(TextSourceBase):
    """JSON lines: one object per line. A bad line is a dead letter; the rest is still read."""

    kind: Literal["jsonl"]
    block_size: int = Field(8 << 20, ge=1 << 12)


class ParquetSource(FileSourceBase):
    """Parquet files. A corrupt file is dead-lettered whole and the run goes on."""

    kind: Literal["parquet"]
    select: list[str] | None = Field(None, description="Read only these columns.")


class XmlSource(TextSourceBase):
    """XML files; ``record_path`` names the repeating element that becomes a row."""

    kind: Literal["xml"]
    record_path: str = Field(
        description="Path of the repeating element, e.g. 'orders/order' or just 'order'."
    )


FileSourceConfig = Annotated[
    CsvSource | JsonSource | JsonlSource | ParquetSource | XmlSource, Field(discriminator="kind")
]


class StreamSourceBase(Model):
    id: str = Field("source", description="Step id of the source (used in dead letters).")
    format: Literal["json", "text"] = Field(
        "json",
        description="Message payload: a JSON object per message (parsed into columns), or "
        "text kept whole in a column named 'value'.",
    )
    columns: dict[str, str] | None = Field(
        None,
        alias="schema",
        description="Explicit column types {name: type}; other fields are inferred per batch. "
        "Declare every column for a stable schema across batches.",
    )

    _types = field_validator("columns")(classmethod(lambda cls, v: _check_types(v)))


class RedisStreamSource(StreamSourceBase):
    """Redis Streams read through a consumer group; messages are acknowledged only after the
    checkpoint that covers them."""

    kind: Literal["redis_stream"]
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL.")
    stream: str | list[str] = Field(description="Stream key(s); each key is one partition.")
    group: str = Field("sluice", description="Consumer group (created at the stream's start).")
    consumer: str = Field("sluice-1", description="Consumer name inside the group.")
    field: str = Field("data", description="Message field that holds the payload.")
    count: int = Field(10_000, ge=1, description="Messages fetched per read call.")


class KafkaSource(StreamSourceBase):
    """Kafka topics through a consumer group; offsets are committed only at checkpoints."""

    kind: Literal["kafka"]
    brokers: str = Field(description="bootstrap.servers, e.g. 127.0.0.1:9092.")
    topic: str | list[str]
    group: str = Field("sluice", description="Consumer group id.")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Extra librdkafka consumer settings."
    )


SourceConfig = Annotated[
    CsvSource
    | JsonSource
    | JsonlSource
    | ParquetSource
    | XmlSource
    | RedisStreamSource
    | KafkaSource,
    Field(discriminator="kind"),
]
STREAM_SOURCE_KINDS = ("redis_stream", "kafka")

# ----------------------------------------------------------------------------------------- steps


class StepBase(Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    from_: str | list[str] | None = Field(
        None,
        alias="from",
        description="Input step id(s); default: the step declared just before. A list merges.",
    )

    def inputs(self, previous: str) -> list[str]:
        if self.from_ is None:
            return [previous]
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)


class SelectStep(StepBase):
    select: list[str] = Field(min_length=1, description="Columns to keep, in this order.")


class RenameStep(StepBase):
    rename: dict[str, str] = Field(min_length=1, description="{old_name: new_name}")


class CastStep(StepBase):
    cast: dict[str, str] = Field(
        min_length=1, description="{column: type}; uncastable values become dead letters."
    )

    _types = field_validator("cast")(classmethod(lambda cls, v: _check_types(v)))


class FilterStep(StepBase):
    filter: str = Field(
        min_length=1, description="SQL boolean expression; rows not true are filtered."
    )


class DeriveStep(StepBase):
    derive: dict[str, str] = Field(
        min_length=1, description="{new_column: SQL expression}, evaluated in order."
    )


class SqlStep(StepBase):
    sql: str = Field(min_length=1, description="DuckDB SQL over the current batch, named `input`.")


class DedupOptions(Model):
    key: list[str] = Field(min_length=1, description="Columns that identify a record.")


class DeduplicateStep(StepBase):
    deduplicate: DedupOptions = Field(
        description="Keep the first row per key across the whole run."
    )


class ContractStep(StepBase):
    contract: str | Contract = Field(
        description="A contract file (relative to the pipeline file) or the contract inline."
    )


class WindowSpec(Model):
    kind: Literal["tumbling", "sliding", "session"] = "tumbling"
    size: str | float | None = Field(
        None,
        description="Window length: '1m', '10s', '1 hour' (or seconds); not for sessions.",
    )
    gap: str | float | None = Field(
        None,
        description="Session windows: a key's session ends after this long without events.",
    )
    idle_timeout: str | float | None = Field(
        None,
        description="A partition that sent nothing for this long (wall clock) is left out of "
        "the watermark, so one quiet partition does not stall windows.",
    )
    early: str | float | None = Field(
        None,
        description="Also emit partial results of open windows this often (processing time), "
        "marked is_final = false; the final row follows when the window closes.",
    )
    slide: str | float | None = Field(
        None, description="Sliding windows: start a window every this long (divides size)."
    )
    time: str = Field(description="Event-time column: timestamp, ISO text, or epoch numbers.")
    time_unit: Literal["s", "ms", "us"] = Field("ms", description="Unit of numeric epoch times.")
    key: str | list[str] | None = Field(None, description="Aggregate per key column(s).")
    lateness: str | float = Field(
        0,
        description="Allowed lateness: a window closes when the watermark (newest event "
        "time minus this) passes its end; later records become dead letters with reason late.",
    )

    def keys(self) -> list[str]:
        return [] if self.key is None else [self.key] if isinstance(self.key, str) else self.key


class WindowStep(StepBase):
    window: WindowSpec
    aggregate: dict[str, str] = Field(
        min_length=1,
        description="{name: 'count()' | 'sum(col)' | 'min(col)' | 'max(col)' | 'mean(col)' | "
        "'first(col)' | 'last(col)' | 'count_distinct(col)'}",
    )


class JoinOptions(Model):
    reference: FileSourceConfig = Field(description="A file source read once, held in memory.")
    key: list[str] = Field(min_length=1, description="Key columns present on both sides.")
    how: Literal["left", "inner"] = "left"
    unmatched: Literal["filter", "dead_letter"] = Field(
        "filter", description="With how=inner: what happens to rows without a match."
    )


class JoinStep(StepBase):
    join: JoinOptions


STEP_KEYS = (
    "select",
    "rename",
    "cast",
    "filter",
    "derive",
    "sql",
    "deduplicate",
    "join",
    "contract",
    "window",
)


def _step_tag(v: Any) -> str | None:
    keys = v.keys() if isinstance(v, dict) else v.__class__.model_fields.keys()
    found = [k for k in STEP_KEYS if k in keys]
    return found[0] if len(found) == 1 else None


StepConfig = Annotated[
    Annotated[SelectStep, Tag("select")]
    | Annotated[RenameStep, Tag("rename")]
    | Annotated[CastStep, Tag("cast")]
    | Annotated[FilterStep, Tag("filter")]
    | Annotated[DeriveStep, Tag("derive")]
    | Annotated[SqlStep, Tag("sql")]
    | Annotated[DeduplicateStep, Tag("deduplicate")]
    | Annotated[JoinStep, Tag("join")]
    | Annotated[ContractStep, Tag("contract")]
    | Annotated[WindowStep, Tag("window")],
    Discriminator(
        _step_tag,
        custom_error_type="step_kind",
        custom_error_message=(
            "a step needs exactly one of: "
            + ", ".join(STEP_KEYS)
            + " (plus 'id' and optional 'from')"
        ),
    ),
]

# ----------------------------------------------------------------------------------------- sinks


class SinkBase(Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    from_: str | list[str] | None = Field(
        None, alias="from", description="Step id(s) to write; default: the last step."
    )

    def inputs(self, previous: str) -> list[str]:
        if self.from_ is None:
            return [previous]
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)


class FileSinkBase(SinkBase):
    path: str = Field(
        description="A directory of part files, or a single file when it ends in the format's "
        "extension. Files appear only when complete (written under a temporary name, then renamed)."
    )


class ParquetSink(FileSinkBase):
    kind: Literal["parquet"]
    partition_by: list[str] = Field(
        default_factory=list, description="Hive-style partition columns."
    )
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    compression_level: int | None = Field(
        None,
        description="Codec level; default for zstd is 1 (measured: same size as pyarrow's "
        "default level on typical data, about 35% faster to write).",
    )
    rows_per_file: int = Field(
        5_000_000, ge=1, description="Start a new part file after this many rows."
    )


class CsvSink(FileSinkBase):
    kind: Literal["csv"]
    delimiter: str = Field(",", min_length=1, max_length=1)
    header: bool = True


class JsonlSink(FileSinkBase):
    kind: Literal["jsonl"]


class DeltaSink(SinkBase):
    kind: Literal["delta"]
    path: str = Field(description="Delta table location (a directory).")
    mode: Literal["append", "overwrite"] = "append"
    partition_by: list[str] = Field(default_factory=list)


class DuckdbSink(SinkBase):
    kind: Literal["duckdb"]
    path: str = Field(description="DuckDB database file (created if missing).")
    table: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\.]*$")
    mode: Literal["append", "replace"] = "append"


class PostgresSink(SinkBase):
    kind: Literal["postgres"]
    dsn: str = Field(description="libpq connection string; use ${ENV_VARS} for secrets.")
    table: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\.]*$")
    mode: Literal["append", "upsert"] = "append"
    key: list[str] = Field(default_factory=list, description="Conflict key columns for upsert.")
    create: bool = Field(True, description="Create the table from the data's schema if missing.")


class RedisStreamSink(SinkBase):
    """XADD each row as a message (JSON in one field). In stream mode each checkpoint epoch is
    added in one MULTI/EXEC transaction together with an epoch marker: exactly once."""

    kind: Literal["redis_stream"]
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL.")
    stream: str = Field(description="Stream key to add to.")
    field: str = Field("data", description="Message field that holds the JSON row.")
    maxlen: int | None = Field(None, ge=1, description="Approximate cap on the stream length.")


class KafkaSink(SinkBase):
    """Produce each row as a JSON message with the idempotent producer."""

    kind: Literal["kafka"]
    brokers: str = Field(description="bootstrap.servers, e.g. 127.0.0.1:9092.")
    topic: str
    key: str | None = Field(None, description="Column whose value is the message key.")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Extra librdkafka producer settings."
    )


SinkConfig = Annotated[
    ParquetSink
    | CsvSink
    | JsonlSink
    | DeltaSink
    | DuckdbSink
    | PostgresSink
    | RedisStreamSink
    | KafkaSink,
    Field(discriminator="kind"),
]


class DeadLetterConfig(Model):
    kind: Literal["jsonl", "parquet"] = "jsonl"
    path: str = Field(
        "dead_letters/{pipeline}",
        description="Directory; each run writes one file named after its run id.",
    )


class Settings(Model):
    batch_rows: int = Field(
        131_072, ge=1, description="Small source batches are merged up to this many rows."
    )
    queue_size: int = Field(
        4, ge=1, description="Batches buffered between reader, steps and sinks."
    )
    report_dir: str = Field(
        "runs/{pipeline}", description="Where each run's JSON report goes ({run_id}.json)."
    )
    retry_attempts: int = Field(
        5, ge=1, description="Tries for a sink write that fails transiently."
    )
    retry_backoff: float = Field(
        0.2, ge=0, description="First retry delay in seconds; doubles each try, with full jitter."
    )
    linger: str | float = Field(
        "50ms",
        description="Stream mode: a micro-batch is cut when it has batch_rows rows or its first "
        "record waited this long.",
    )


class CheckpointConfig(Model):
    """Stream mode: where and how often the checkpoint (epoch, source positions, operator
    state, sink commit tokens) is written."""

    path: str = Field(
        "state/{pipeline}.db", description="SQLite file holding the checkpoints (created)."
    )
    every: str | float = Field("1s", description="Checkpoint interval.")
    keep: int = Field(3, ge=2, description="Checkpoints kept (older ones are the fallback).")
    backend: Literal["memory", "rocksdb"] = Field(
        "memory",
        description="State store: 'memory' keeps operator state in memory, snapshotted into "
        "the SQLite checkpoints; 'rocksdb' (extra rocksdb) keeps the keys of deduplicate and "
        "unique checks in RocksDB on disk (larger than memory; checkpoints hard-link its files). "
        "Window state stays in memory.",
    )


class PipelineConfig(Model):
    """The immutable pipeline graph: one source, steps in order, sinks, a dead-letter output."""

    pipeline: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    source: SourceConfig
    steps: list[StepConfig] = Field(default_factory=list)
    sinks: list[SinkConfig] = Field(
        default_factory=list, description="Outputs; none is fine for a check-only pipeline."
    )
    dead_letter: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    settings: Settings = Field(default_factory=Settings)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @property
    def streaming(self) -> bool:
        """True when the source is unbounded (a broker, or a watched folder)."""
        return self.source.kind in STREAM_SOURCE_KINDS or bool(getattr(self.source, "watch", False))

    def step(self, step_id: str) -> Any:
        for node in (self.source, *self.steps, *self.sinks):
            if node.id == step_id:
                return node
        raise KeyError(step_id)
