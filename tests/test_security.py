"""Security at the edge: DICOM TLS with DCMTK, and calling AEs bound to addresses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.certificates import Certificates, make_certificates
from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess, storescu


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_node(
    folder: Path, model: Path, certificates: Certificates, processes: int = 1
) -> NodeProcess:
    return NodeProcess(
        folder,
        model,
        settings={
            "PACS_NODE_DICOM__RECEIVE_PROCESSES": str(processes),
            "PACS_NODE_DICOM__TLS__CERTIFICATE": str(certificates.server_certificate),
            "PACS_NODE_DICOM__TLS__PRIVATE_KEY": str(certificates.server_key),
            "PACS_NODE_DICOM__TLS__CLIENT_CA": str(certificates.ca),
            "PACS_NODE_DICOM__TLS__REQUIRE_CLIENT_CERTIFICATE": "true",
        },
    )


@pytest.mark.parametrize("processes", [1, 3])
def test_dcmtk_stores_over_tls_with_a_client_certificate(
    tmp_path: Path, tiny_model: Path, certificates: Certificates, processes: int
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    with tls_node(tmp_path / "node", tiny_model, certificates, processes) as node:
        assert node.has_logged("(TLS)")
        secure = [
            "+tls",
            str(certificates.client_key),
            str(certificates.client_certificate),
            "+cf",
            str(certificates.ca),
        ]
        sent = storescu(node.port, "PACSNODE", files, extra=secure)
        assert sent.returncode == 0, sent.stderr
        assert (sent.stdout + sent.stderr).count("Received Store Response (Success)") == 3

        # Without a client certificate the handshake fails: nothing is stored.
        anonymous = storescu(
            node.port, "PACSNODE", files[:1], extra=["+tla", "+cf", str(certificates.ca)]
        )
        assert anonymous.returncode != 0
        # Plain TCP to the TLS port is not DICOM to this node either.
        plain = storescu(node.port, "PACSNODE", files[:1])
        assert plain.returncode != 0
        # ... and the node goes on serving TLS clients, in whichever process accepts.
        for _ in range(2 * processes):
            again = storescu(node.port, "PACSNODE", files[:1], extra=secure)
            assert again.returncode == 0, again.stderr
    assert len(list((tmp_path / "node" / "instances").rglob("*.dcm"))) == 3


def test_a_calling_ae_from_another_address_is_turned_away(tmp_path: Path, tiny_model: Path) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=1)
    node = NodeProcess(
        tmp_path / "node",
        tiny_model,
        settings={
            "PACS_NODE_DICOM__ALLOWED_ADDRESSES": json.dumps(
                {"CTSCANNER": ["10.20.30.40"], "LOCAL": ["127.0.0.0/8"]}
            )
        },
    )
    with node:
        turned_away = storescu(node.port, "PACSNODE", files, calling_ae="CTSCANNER")
        assert (
            turned_away.returncode != 0 or "Success" not in turned_away.stdout + turned_away.stderr
        )
        wait_for(
            lambda: node.has_logged("address not allowed for this calling AE"), 10, "the log line"
        )
        allowed = storescu(node.port, "PACSNODE", files, calling_ae="LOCAL")
        assert allowed.returncode == 0, allowed.stderr
        assert "Received Store Response (Success)" in allowed.stdout + allowed.stderr
