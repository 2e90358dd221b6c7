"""The node's settings: one typed object from a TOML file and the environment.

Precedence, highest first: environment variables `PACS_NODE_<SECTION>__<KEY>`
(lists and tables as JSON), the TOML file, the defaults below.
`config/node.toml` documents every key. The object is validated once at
start-up and passed explicitly; nothing reads it from a global.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from pacs_node.errors import ConfigurationError

DEFAULT_CONFIG = Path("config/node.toml")
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "bundled" / "lung-ct-mobilenetv2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Characters the standard allows in an AE title (PS3.5 6.2: default repertoire, no backslash).
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class Section(BaseModel):
    """A settings table; unknown keys are errors, so a typo cannot go unnoticed."""

    model_config = ConfigDict(extra="forbid")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value.strip()


class TlsSettings(Section):
    """DICOM over TLS (PS3.15 B.1). Off unless a certificate is given."""

    # PEM files: the node's certificate (chain) and its private key.
    certificate: Path | None = None
    private_key: Path | None = None
    # PEM CA certificates that client certificates must chain to.
    client_ca: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("dicom.tls needs both certificate and private_key, or neither")
        if self.require_client_certificate and self.client_ca is None:
            raise ValueError("dicom.tls.require_client_certificate needs dicom.tls.client_ca")
        for name in ("certificate", "private_key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"dicom.tls.{name}: {path} does not exist")
        return self

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


class DicomSettings(Section):
    ae_title: str = "PACSNODE"
    # True: an association request must call ae_title.
    check_called_ae_title: bool = False
    port: int = Field(default=11112, ge=1, le=65535)
    bind: str = "0.0.0.0"
    # Empty: any calling AE may associate.
    allowed_calling_aes: list[str] = Field(default_factory=list)
    # Per calling AE, the addresses (IP or CIDR network) it may associate from;
    # an AE not listed here may associate from anywhere.
    allowed_addresses: dict[str, list[IPvAnyNetwork]] = Field(default_factory=dict)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    max_associations: int = Field(default=16, ge=1)
    # Processes that accept associations from the one port (1: the serving process
    # alone). More let parallel associations use more cores; "auto": two, or one
    # per 4 cores where that is more, at most 4 (`stage_process.receive_process_count`).
    receive_processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_allowed(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(value) for value in values]


class StorageSettings(Section):
    root: Path = Path("var")
    # fsync every received file and its folder before acknowledging it.
    fsync: bool = True
    # Below this much free space, C-STOREs are refused with 0xA700 until it recovers.
    min_free_mb: int = Field(default=2048, ge=0)


class DatabaseSettings(Section):
    # Empty: a SQLite file under storage.root.
    url: str = ""
    # A file holding the database password (e.g. a mounted secret), so that
    # neither the URL in node.toml nor the environment needs to carry it.
    password_file: Path | None = None

    @field_validator("password_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} does not exist")
        return path


class IntakeSettings(Section):
    """Which received instances become inference work; the rest are only stored."""

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    sop_classes: list[str] = Field(default_factory=lambda: [CT_IMAGE_STORAGE])
    # ImageType values that mark an image as a localizer/scout, never classified.
    excluded_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER", "SCOUT"])


class SeriesSettings(Section):
    quiet_seconds: float = Field(default=30.0, gt=0)
    # Per calling AE title, for modalities that pause longer between images.
    quiet_seconds_by_ae: dict[str, float] = Field(default_factory=dict)
    sweep_seconds: float = Field(default=1.0, gt=0)


class InferenceSettings(Section):
    model: Path = BUNDLED_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=16, ge=1, le=1024)
    # Threads that read and decode the next batch while the model runs the current
    # one; "auto" chooses by device and cores (`inference.decode_thread_count`).
    decode_threads: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # On a CPU: how many batches the model runs at once, each in its own ONNX
    # Runtime session on an equal share of the threads (`cores.forward_threads`);
    # "auto" chooses by device and threads (`inference.forward_lane_count`).
    # With CUDA there is one.
    forward_lanes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # Processes that run the infer stage side by side, each on an equal share of
    # the cores, one series each at a time; "auto" chooses by cores
    # (`stage_process.infer_process_count`).
    processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # CPU priority (nice) of the infer process a receiving `serve` starts: it
    # gets the CPU the receiver leaves, so C-STOREs stay fast during inference.
    nice: int = Field(default=19, ge=0, le=19)
    # That infer process waits between batches while C-STOREs arrive, at most
    # this long per batch (0: never), so that receiving keeps its idle speed.
    pause_while_receiving_seconds: float = Field(default=2.0, ge=0, le=60)
    max_attempts: int = Field(default=3, ge=1)


class Destination(Section):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)

    @property
    def key(self) -> str:
        """How a destination is named in the job store and in logs."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class ResultsSettings(Section):
    destinations: list[Destination] = Field(default_factory=list)
    max_attempts: int = Field(default=8, ge=1)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    # The SR's Institution Name, a LO value (PS3.5 6.2).
    institution_name: str = Field(default="", max_length=64)

    @model_validator(mode="after")
    def _unique_destinations(self) -> ResultsSettings:
        keys = [destination.key for destination in self.destinations]
        if len(keys) != len(set(keys)):
            raise ValueError(f"results.destinations lists a destination twice: {keys}")
        return self


class QueueSettings(Section):
    lease_seconds: float = Field(default=60.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    reap_seconds: float = Field(default=30.0, gt=0)
    # Above this many queued or running jobs, C-STOREs are refused with 0xA700.
    max_depth: int = Field(default=1000, ge=1)


class RetentionSettings(Section):
    """When received instance files are deleted; their rows stay as the history."""

    # Days after a series' last instance, once its SR is delivered to every
    # destination; 0 keeps the files forever.
    keep_days: float = Field(default=30.0, ge=0)
    sweep_seconds: float = Field(default=3600.0, gt=0)

    @property
    def enabled(self) -> bool:
        return self.keep_days > 0


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PACS_NODE_", env_nested_delimiter="__", extra="forbid"
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @property
    def database_url(self) -> str:
        if not self.database.url:
            return f"sqlite:///{(self.storage.root / 'pacs-node.sqlite3').resolve()}"
        if self.database.password_file is None:
            return self.database.url
        password = self.database.password_file.read_text().strip()
        url = make_url(self.database.url).set(password=password)
        return url.render_as_string(hide_password=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(path: Path | None = None) -> Settings:
    """Settings from `path` (default `config/node.toml` if it exists) and the environment.

    Raises `ConfigurationError` with every problem, each named by its key.
    """
    toml_file = path if path is not None else DEFAULT_CONFIG
    if path is not None and not path.is_file():
        raise ConfigurationError(f"configuration file {path} does not exist")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=toml_file if toml_file.is_file() else None)

    try:
        return FileSettings()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        raise ConfigurationError(f"invalid configuration ({toml_file}): {problems}") from error
    except ValueError as error:  # malformed TOML or JSON in an environment variable
        raise ConfigurationError(f"invalid configuration ({toml_file}): {error}") from error
