"""The recorder: an append-only log of every upstream frame of every followed fixture.

Per fixture, segments of record lines (``{"seq":..,"pos":..,"t":..,"data":<frame>}``, see
:mod:`gateway.recorder._format`) under ``[recorder] dir``, written by a thread fed through a
bounded queue, fsynced every ``fsync_interval``, closed segments zstd-compressed, old ones
removed by retention. On start each recording is checked and cut after its last intact line;
the service continues each topic's epoch and seq from it and resumes the upstream from the
recorded vendor position. Backfills older than the memory history and downloads read the
files back in worker threads. Layout and guarantees: docs/recorder.md.

Imports only the leaves (config, logs): the service wires it beside the hub and the
upstream, which do not know it.
"""

from gateway.recorder._format import (
    COMPRESSED_SUFFIX,
    RECORD_PREFIX,
    SEGMENT_SUFFIX,
    BadRecord,
    Record,
    decode,
    encode,
    is_record,
    parse_segment_name,
    segment_name,
)
from gateway.recorder._recorder import (
    CLOSE_TIMEOUT,
    DISK_READERS,
    DOWNLOAD_CHUNK,
    QUEUE_FULL,
    Recorder,
    recording_path,
)
from gateway.recorder._retention import FixtureUsage, SegmentUsage, choose_deletions
from gateway.recorder._scan import LineScanner, SegmentInfo, iter_records, open_segment
from gateway.recorder._store import (
    IDLE,
    RECORDING,
    STOPPED,
    Cursor,
    FixtureLog,
    dir_name,
    read_recording,
)
from gateway.recorder._threads import (
    BATCH_INTERVAL,
    COMPRESS_LEVEL,
    RUN_STATE,
    describe_error,
)

__all__ = [
    "BATCH_INTERVAL",
    "CLOSE_TIMEOUT",
    "COMPRESSED_SUFFIX",
    "COMPRESS_LEVEL",
    "DISK_READERS",
    "DOWNLOAD_CHUNK",
    "IDLE",
    "QUEUE_FULL",
    "RECORDING",
    "RECORD_PREFIX",
    "RUN_STATE",
    "SEGMENT_SUFFIX",
    "STOPPED",
    "BadRecord",
    "Cursor",
    "FixtureLog",
    "FixtureUsage",
    "LineScanner",
    "Record",
    "Recorder",
    "SegmentInfo",
    "SegmentUsage",
    "choose_deletions",
    "decode",
    "describe_error",
    "dir_name",
    "encode",
    "is_record",
    "iter_records",
    "open_segment",
    "parse_segment_name",
    "read_recording",
    "recording_path",
    "segment_name",
]
