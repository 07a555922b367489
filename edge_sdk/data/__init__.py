"""The edge SDK's data layer: RLAIF-V records and a synthetic non-IID federation.

- :func:`load_records` / :func:`write_records`: RLAIF-V parquet or JSON Lines to and from
  :class:`Record` (image, question, chosen, rejected, origin_dataset, model,
  feedback_model, type, source).
- :func:`scan_data` / :class:`DataIndex`: streaming over many shards: every row's text is
  checked without reading images, :func:`partition_rows` splits the row references into
  clients (:class:`PartitionSpec`), and ``DataIndex.load`` reads only the sampled rows.
- :func:`write_preference_shards`: an offline RLAIF-V-like data set (long-form chosen
  answers, hallucinated rejected ones, several sources) in the exact published schema.
- :func:`generate_federation` with a :class:`ScenarioConfig` (presets ``iid``,
  ``concept-shift``, ``label-skew``, ``task-skew``, ``mixed``): a seeded synthetic visual
  QA federation with per-client train/test splits and a common test set.
"""

from fedvlm.edge.data.conventions import (
    CLASSES,
    LANGUAGES,
    NEUTRAL_CONVENTION,
    QUESTION_KINDS,
    Convention,
    client_convention,
    convention_vocabulary_lines,
)
from fedvlm.edge.data.bad_rows import REASONS as BAD_ROW_REASONS
from fedvlm.edge.data.bad_rows import SkippedRows
from fedvlm.edge.data.partitioning import PartitionSpec, PartitionTable, client_shares, partition_rows, sample_rows
from fedvlm.edge.data.reading import load_client_share, load_records
from fedvlm.edge.data.records import DataError, EncodedImage, LoadedRecords, Record
from fedvlm.edge.data.row_index import PARTITION_KEYS, DataIndex, RowRef, scan_data
from fedvlm.edge.data.scenario import PRESETS, ClientProfile, ScenarioConfig
from fedvlm.edge.data.synthetic import (
    ClientData,
    Federation,
    all_words,
    generate_federation,
    pretraining_records,
    question_kind,
)
from fedvlm.edge.data.writing import write_records

__all__ = [
    "BAD_ROW_REASONS",
    "DataIndex",
    "PARTITION_KEYS",
    "PartitionSpec",
    "PartitionTable",
    "RowRef",
    "SkippedRows",
    "client_shares",
    "partition_rows",
    "sample_rows",
    "scan_data",
    "CLASSES",
    "ClientData",
    "ClientProfile",
    "Convention",
    "DataError",
    "EncodedImage",
    "Federation",
    "LANGUAGES",
    "LoadedRecords",
    "NEUTRAL_CONVENTION",
    "PRESETS",
    "QUESTION_KINDS",
    "Record",
    "ScenarioConfig",
    "all_words",
    "client_convention",
    "convention_vocabulary_lines",
    "generate_federation",
    "load_client_share",
    "load_records",
    "pretraining_records",
    "question_kind",
    "write_records",
]
