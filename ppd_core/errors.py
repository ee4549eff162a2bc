"""User-facing errors. The CLI prints these as one clear message (no stack trace) and exits 2."""


class PPDError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class ConfigError(PPDError):
    """The configuration is invalid: an unknown key, a wrong type, a missing file."""


class SchemaError(PPDError):
    """An input table does not have the expected columns or types."""


class InputError(PPDError):
    """An input file or URL cannot be read (missing, truncated, not Parquet)."""


class StageError(PPDError):
    """A stage cannot run: a missing upstream output or an inconsistent request."""


class RewardError(PPDError):
    """A reward model cannot be loaded or asked: missing or mismatched weights, a bad reward spec."""
