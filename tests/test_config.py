"""Settings: the TOML file, environment overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_node.config import BUNDLED_MODEL, load_settings
from pacs_node.errors import ConfigurationError
from tests.peers import REPO


def test_documented_file_loads_with_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACS_NODE_DICOM__PORT", raising=False)
    settings = load_settings(REPO / "config" / "node.toml")
    assert settings.dicom.ae_title == "PACSNODE"
    assert settings.dicom.port == 11112
    assert settings.inference.model == BUNDLED_MODEL
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("var/pacs-node.sqlite3")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[dicom]\nport = 104\nae_title = "FROMFILE"\n[series]\nquiet_seconds = 9\n')
    monkeypatch.setenv("PACS_NODE_DICOM__PORT", "4100")
    monkeypatch.setenv(
        "PACS_NODE_RESULTS__DESTINATIONS", '[{"ae_title":"PACS","host":"127.0.0.1","port":4242}]'
    )
    monkeypatch.setenv("PACS_NODE_DICOM__ALLOWED_CALLING_AES", '["CT1", "CT2"]')
    settings = load_settings(config)
    assert settings.dicom.port == 4100
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.series.quiet_seconds == 9
    assert settings.dicom.allowed_calling_aes == ["CT1", "CT2"]
    (destination,) = settings.results.destinations
    assert destination.key == "PACS@127.0.0.1:4242"


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("PACS_NODE_DICOM__PORT", "70000", "dicom.port"),
        ("PACS_NODE_DICOM__AE_TITLE", "A" * 17, "dicom.ae_title"),
        ("PACS_NODE_INFERENCE__DEVICE", "tpu", "inference.device"),
        ("PACS_NODE_RESULTS__DESTINATIONS", '[{"host":"x","port":1}]', "results.destinations"),
        ("PACS_NODE_RESULTS__DESTINATIONS", "not json", "results"),
        ("PACS_NODE_SERIES__QUIET_SECONDS", "0", "series.quiet_seconds"),
        ("PACS_NODE_DICOM__TLS__CERTIFICATE", "/no/such.crt", "dicom.tls"),
        ("PACS_NODE_DICOM__TLS__REQUIRE_CLIENT_CERTIFICATE", "true", "dicom.tls"),
        (
            "PACS_NODE_DICOM__ALLOWED_ADDRESSES",
            '{"CT1": ["not-an-address"]}',
            "dicom.allowed_addresses",
        ),
        ("PACS_NODE_DATABASE__PASSWORD_FILE", "/no/such/file", "database.password_file"),
        ("PACS_NODE_RESULTS__INSTITUTION_NAME", "I" * 65, "results.institution_name"),
        ("PACS_NODE_INFERENCE__DECODE_THREADS", "0", "inference.decode_threads"),
        ("PACS_NODE_INFERENCE__DECODE_THREADS", "many", "inference.decode_threads"),
        ("PACS_NODE_INFERENCE__FORWARD_LANES", "0", "inference.forward_lanes"),
        ("PACS_NODE_INFERENCE__FORWARD_LANES", "wide", "inference.forward_lanes"),
        ("PACS_NODE_INFERENCE__PROCESSES", "0", "inference.processes"),
        ("PACS_NODE_INFERENCE__PROCESSES", "many", "inference.processes"),
        ("PACS_NODE_DICOM__RECEIVE_PROCESSES", "0", "dicom.receive_processes"),
        ("PACS_NODE_DICOM__RECEIVE_PROCESSES", "many", "dicom.receive_processes"),
    ],
)
def test_invalid_values_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text("")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=named.replace(".", r"\.")):
        load_settings(config)


def test_unknown_keys_and_missing_files_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[dicom]\nprot = 104\n")
    with pytest.raises(ConfigurationError, match=r"dicom\.prot"):
        load_settings(config)
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_the_database_password_can_come_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr=t/pw\n")
    config = tmp_path / "node.toml"
    config.write_text('[database]\nurl = "postgresql+psycopg://pacs@db.example:5432/pacsnode"\n')
    monkeypatch.setenv("PACS_NODE_DATABASE__PASSWORD_FILE", str(secret))
    url = load_settings(config).database_url
    assert url == "postgresql+psycopg://pacs:s3cr%3Dt%2Fpw@db.example:5432/pacsnode"
