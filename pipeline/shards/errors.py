"""The errors of the whole input side, each a one-line message the user can act on. They live here, below every
other module, so that the format, storage, the reader and the writer can raise them without importing each other."""


class PipelineError(RuntimeError):
    """An input problem the user can fix (data on disk, machine resources); the message says what, in one line."""


class ShardError(PipelineError):
    """A shard set on disk that the pipeline cannot use; the message says which file and why."""


class SampleError(ShardError):
    """One sample that cannot be used; the message names the shard file and the sample key."""


class SettingsError(PipelineError):
    """Loader settings the data cannot serve (a batch larger than the split): the user changes a flag, as for any
    impossible value (train.py exits 2)."""


class UsageError(Exception):
    """Bad input to the shard writer that the user must fix (reported in one line, exit status 2)."""
