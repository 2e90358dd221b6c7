"""The upper layer as the node's peers see it: negotiation, framing, refusals.

The receiver runs in-process; peers are pynetdicom and raw sockets speaking
PS3.8 byte by byte, so each test names the exact PDU the standard requires.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from pacs_node.acceptor import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacs_node.config import DicomSettings, IntakeSettings
from pacs_node.receiver import Receiver
from pacs_node.storage import Storage
from pacs_node.store import JobStore
from tests.bad_input import association_request, closed_by_peer, ct_slice, raw_connection
from tests.peers import free_port
from tests.scu import associate

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    storage = Storage(tmp_path / "var")
    store = JobStore(f"sqlite:///{tmp_path / 'var' / 'db.sqlite3'}")
    store.upgrade()
    node = Receiver(
        DicomSettings(port=free_port(), bind="127.0.0.1", max_associations=1),
        IntakeSettings(),
        storage,
        store,
    )
    node.start()
    yield node
    node.stop()
    store.close()


def answer_to(port: int, request: bytes) -> bytes:
    with raw_connection(port) as connection:
        connection.sendall(request)
        return closed_by_peer(connection)


def rejection(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])


def test_a_request_beyond_max_associations_is_rejected_as_transient(receiver: Receiver) -> None:
    first = associate(receiver.port, ct_slice())
    try:
        # Transient, service-provider (presentation), local limit exceeded.
        assert answer_to(receiver.port, association_request("SECOND")) == rejection(2, 3, 2)
    finally:
        first.release()
    # The released association no longer counts.
    associate(receiver.port, ct_slice()).release()


def test_an_unsupported_protocol_version_is_rejected(receiver: Receiver) -> None:
    request = association_request("OLDPEER", protocol_version=2)
    assert answer_to(receiver.port, request) == rejection(1, 2, 2)


def test_another_application_context_is_rejected(receiver: Receiver) -> None:
    request = association_request("OTHER", application_context_name=b"1.2.3.4")
    assert answer_to(receiver.port, request) == rejection(1, 1, 2)


def command_set(command_field: int) -> bytes:
    """A request command set on CT Image Storage, without a data set."""
    elements = [
        (0x0002, CT_IMAGE_STORAGE.encode() + b"\0"),
        (0x0100, struct.pack("<H", command_field)),
        (0x0110, struct.pack("<H", 1)),
        (0x0800, struct.pack("<H", 0x0101)),
    ]
    body = b"".join(
        struct.pack("<HHL", 0, element, len(value)) + value for element, value in elements
    )
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def p_data(context_id: int, control: int, value: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def abort_after(port: int, pdu: bytes) -> bytes:
    """Associate (context 1: CT Image Storage), send `pdu`; what the node answers."""
    with raw_connection(port) as connection:
        connection.sendall(association_request("RAWPEER"))
        accepted = connection.recv(6)
        assert accepted[0] == 0x02  # A-ASSOCIATE-AC
        connection.recv(struct.unpack(">L", accepted[2:6])[0])
        connection.sendall(pdu)
        return closed_by_peer(connection)


def a_abort(reason: int) -> bytes:
    """An A-ABORT from the service provider (PS3.8 9.3.8)."""
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, reason])


def test_an_unsupported_dimse_command_aborts_the_association(receiver: Receiver) -> None:
    # A C-FIND-RQ (0x0020) on the CT Image Storage context: unexpected.
    assert abort_after(receiver.port, p_data(1, 0x03, command_set(0x0020))) == a_abort(2)


def test_a_fragment_for_a_context_never_accepted_aborts_the_association(
    receiver: Receiver,
) -> None:
    # Context 3 was never proposed: invalid PDU parameter value.
    assert abort_after(receiver.port, p_data(3, 0x03, command_set(0x0001))) == a_abort(6)


def test_a_data_set_fragment_without_its_command_aborts_the_association(
    receiver: Receiver,
) -> None:
    assert abort_after(receiver.port, p_data(1, 0x02, b"\x08\x00\x16\x00")) == a_abort(2)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_the_stored_file_names_the_negotiated_transfer_syntax_and_the_node(
    tmp_path: Path, receiver: Receiver, syntax: str
) -> None:
    dataset = ct_slice()
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CT_IMAGE_STORAGE, syntax)
    association = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
    assert association.is_established
    assert association.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    try:
        assert association.send_c_store(dataset).Status == 0
    finally:
        association.release()
    (stored,) = (tmp_path / "var" / "instances").rglob("*.dcm")
    meta = pydicom.dcmread(stored).file_meta
    assert meta.TransferSyntaxUID == syntax
    assert meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME


def test_responses_are_fragmented_to_the_peer_maximum_pdu(receiver: Receiver) -> None:
    dataset = ct_slice()
    ae = AE(ae_title="SMALLPDU")
    # Smaller than a C-STORE-RSP command set: the node must split it across PDUs.
    ae.maximum_pdu_size = 64
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
    assert association.is_established
    try:
        assert association.send_c_store(dataset).Status == 0
    finally:
        association.release()
