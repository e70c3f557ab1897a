"""One exception hierarchy for molcloak.

Every error inherits `MolcloakError` and the matching built-in, so callers can
catch either. Messages say what failed, the value seen, what was expected and
the fix. The CLI prints them as one line (exit 2), the server turns them into a
4xx JSON body, the app into `gr.Error`.
"""

from __future__ import annotations


class MolcloakError(Exception):
    """Base class of all molcloak errors."""


class DataError(MolcloakError, ValueError):
    """A dataset, CSV file or column is unusable."""


class InvalidSmilesError(DataError):
    """A SMILES string could not be parsed by RDKit."""


class FeaturizerError(MolcloakError, ValueError):
    """A featurizer spec is malformed or does not match the data."""


class ConfigError(MolcloakError, ValueError):
    """An invalid setting: a compile, training, run, bench or tune configuration, or a CLI option value."""


class ModelConfigError(ConfigError):
    """An unknown model name or an invalid model/training option."""


class TorchImportError(ModelConfigError):
    """An imported PyTorch model cannot be read, has unsupported layers or does not fit the data."""


class CompilationError(MolcloakError, RuntimeError):
    """Concrete ML could not compile the network to a TFHE circuit."""


class BundleError(MolcloakError, ValueError):
    """A deployment bundle is missing, incomplete or was made by other package versions."""


class KeysError(MolcloakError, LookupError):
    """Keys are missing or do not belong to the bundle they are used with."""


class CiphertextError(MolcloakError, ValueError):
    """Serialized ciphertext or evaluation-key bytes are malformed or for another circuit."""


class UnknownModelError(MolcloakError, LookupError):
    """The server does not host a model of that name."""


class KeyMismatchError(KeysError):
    """A key id was used with a model other than the one its keys were generated for."""


class ServerBusyError(MolcloakError, RuntimeError):
    """The FHE job queue is full or a worker restarted; retry later."""


class WorkerCrashError(ServerBusyError):
    """An FHE worker process died while it evaluated a job (it was replaced)."""


class KeysRevokedError(KeysError):
    """A key id was revoked by the server: a job with its evaluation keys crashed an FHE worker."""


class JobTimeoutError(ServerBusyError):
    """An FHE job ran longer than the server's job timeout; its worker was replaced."""


class BodyTooLargeError(MolcloakError, ValueError):
    """A request body is over the server's size limit."""


class KeyStorageError(MolcloakError, OSError):
    """The server could not store uploaded evaluation keys (disk full or not writable)."""


class RemoteError(MolcloakError, RuntimeError):
    """The FHE server answered with an error or could not be reached."""


class StepError(MolcloakError, RuntimeError):
    """A step was asked for before the step it needs (e.g. run before encrypt, in the app)."""


class AuditError(MolcloakError, ValueError):
    """An audit cannot start or resume: the test set or saved progress does not match the model."""


class TuneError(MolcloakError, ValueError):
    """A tune or fit search cannot produce a configuration (empty grid, nothing fits the budget)."""


class QuotaError(MolcloakError, RuntimeError):
    """A server quota is reached: key sets per model (per token when the server has tokens); HTTP 429.

    `headers` are sent with the answer (Retry-After, the remaining prediction budget)."""

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = dict(headers or {})


class BudgetExhaustedError(QuotaError):
    """A key id (or token) has used its prediction budget (`--max-predictions-per-key`/`-per-token`)."""


class RateLimitedError(QuotaError):
    """More predictions per minute than the server's `--rate` allows for one key id; retry after a while."""


class ForbiddenError(MolcloakError, PermissionError):
    """The request's token may not do this (an audit-only token asking for per-molecule predictions); HTTP 403."""


class KeyStorageFullError(KeyStorageError):
    """Storing uploaded evaluation keys would exceed the server's `--max-key-storage-mb` (HTTP 507)."""


class NotEligibleError(MolcloakError, ValueError):
    """A circuit the server's linear fast path does not evaluate, and why (`linear_fast_path`; never shown as an
    error: Concrete's runtime serves the model and `PrivateServer.engine` gives the reason)."""
