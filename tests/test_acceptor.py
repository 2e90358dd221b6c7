"""The upper layer as the node's peers see it: negotiation, framing, refusals.

The receiver runs in-process; peers are pynetdicom and raw sockets speaking
PS3.8 byte by byte, so each test names the exact PDU the standard requires.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from pacs_node.acceptor import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacs_node.config import DicomSettings, IntakeSettings, TlsSettings
from pacs_node.receiver import Receiver
from pacs_node.storage import Storage
from pacs_node.store import JobStore
from tests.bad_input import (
    answer_to,
    association_request,
    closed_by_peer,
    ct_slice,
    encoded,
    item,
    presentation_context,
    raw_connection,
    rejection,
)
from tests.certificates import make_certificates
from tests.peers import free_port
from tests.scu import associate

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
# The receivers here allow one association, and a new connection this long to associate.
ACSE_TIMEOUT = 1.5


@contextmanager
def running_receiver(
    folder: Path, check_called_ae_title: bool = False, tls: TlsSettings | None = None
) -> Iterator[Receiver]:
    """A receiver allowing one association, and a new connection ACSE_TIMEOUT to associate."""
    storage = Storage(folder / "var")
    store = JobStore(f"sqlite:///{folder / 'var' / 'db.sqlite3'}")
    store.upgrade()
    node = Receiver(
        DicomSettings(
            port=free_port(),
            bind="127.0.0.1",
            max_associations=1,
            acse_timeout_seconds=ACSE_TIMEOUT,
            check_called_ae_title=check_called_ae_title,
            tls=tls or TlsSettings(),
        ),
        IntakeSettings(),
        storage,
        store,
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()
        store.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with running_receiver(tmp_path) as node:
        yield node


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


def command_set(
    command_field: int, sop_class: str = CT_IMAGE_STORAGE, sop_instance: str | None = None
) -> bytes:
    """A request command set, by default on CT Image Storage; with `sop_instance`, a
    C-STORE's: a data set follows."""
    elements = [
        (0x0002, _uid(sop_class)),
        (0x0100, struct.pack("<H", command_field)),
        (0x0110, struct.pack("<H", 1)),
        (0x0800, struct.pack("<H", 0x0101 if sop_instance is None else 0x0000)),
    ]
    if sop_instance is not None:
        elements += [(0x0700, struct.pack("<H", 0)), (0x1000, _uid(sop_instance))]
    body = b"".join(
        struct.pack("<HHL", 0, element, len(value)) + value for element, value in elements
    )
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def _uid(value: str) -> bytes:
    return value.encode() + b"\0" * (len(value) % 2)


def p_data(context_id: int, control: int, value: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def associated(port: int, contexts: bytes | None = None) -> socket.socket:
    """A raw connection, associated (by default context 1: CT Image Storage)."""
    connection = raw_connection(port)
    connection.sendall(association_request("RAWPEER", contexts=contexts))
    pdu_type, _ = read_pdu(connection)
    assert pdu_type == 0x02  # A-ASSOCIATE-AC
    return connection


def read_pdu(connection: socket.socket) -> tuple[int, bytes]:
    header = _read(connection, 6)
    return header[0], _read(connection, struct.unpack(">L", header[2:6])[0])


def _read(connection: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        piece = connection.recv(length - len(data))
        assert piece, "the node closed the connection"
        data += piece
    return data


def response_status(connection: socket.socket) -> int:
    """The Status of the node's next response (one PDV, as the node sends it here)."""
    pdu_type, body = read_pdu(connection)
    assert pdu_type == 0x04 and body[5] == 0x03  # P-DATA-TF: the last command fragment
    command = body[6:]
    offset = 0
    while offset < len(command):
        _, element, length = struct.unpack_from("<HHL", command, offset)
        if element == 0x0900:
            return int(struct.unpack_from("<H", command, offset + 8)[0])
        offset += 8 + length
    raise AssertionError("no Status in the response")


def abort_after(port: int, pdu: bytes) -> bytes:
    """Associate (context 1: CT Image Storage), send `pdu`; what the node answers."""
    with associated(port) as connection:
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


# --- negotiation: malformed requests, ARTIM, connections that never associate -----


UNKNOWN_ITEM = item(0x7E, b"not a DICOM item")


@pytest.mark.parametrize(
    "request_bytes",
    [
        association_request("UNKNOWN", last_items=UNKNOWN_ITEM),
        association_request("UNKNOWN", user_sub_items=UNKNOWN_ITEM),
        association_request(
            "UNKNOWN",
            contexts=item(
                0x20,
                bytes([1, 0, 0, 0])
                + item(0x30, CT_IMAGE_STORAGE.encode())
                + UNKNOWN_ITEM
                + item(0x40, ExplicitVRLittleEndian.encode()),
            ),
        ),
    ],
    ids=["item", "user information sub-item", "presentation context sub-item"],
)
def test_items_of_unrecognized_types_are_skipped(receiver: Receiver, request_bytes: bytes) -> None:
    """PS3.8 9.3.1: "Items of unrecognized types shall be ignored and skipped"."""
    with raw_connection(receiver.port) as connection:
        connection.sendall(request_bytes)
        pdu_type, body = read_pdu(connection)
        assert pdu_type == 0x02  # A-ASSOCIATE-AC
        assert context_results(body) == {1: 0}  # CT Image Storage accepted
        connection.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        assert read_pdu(connection)[0] == 0x06  # A-RELEASE-RP


def test_a_sub_item_longer_than_its_item_is_aborted(receiver: Receiver) -> None:
    abstract_syntax = struct.pack(">BBH", 0x30, 0, 200) + CT_IMAGE_STORAGE.encode()  # 200: no
    contexts = item(0x20, bytes([1, 0, 0, 0]) + abstract_syntax)
    assert answer_to(receiver.port, association_request("OVERLONG", contexts=contexts)) == (
        a_abort(6)
    )


def context_results(associate_ac_body: bytes) -> dict[int, int]:
    """Presentation context ID -> result of each context in an A-ASSOCIATE-AC."""
    results = {}
    offset = 68  # the fixed fields after the PDU header (PS3.8 9.3.3)
    while offset < len(associate_ac_body):
        kind, length = (
            associate_ac_body[offset],
            struct.unpack(">H", associate_ac_body[offset + 2 : offset + 4])[0],
        )
        if kind == 0x21:
            results[associate_ac_body[offset + 4]] = associate_ac_body[offset + 6]
        offset += 4 + length
    return results


@pytest.mark.parametrize(
    "contexts",
    [
        presentation_context(1, CT_IMAGE_STORAGE.encode(), transfer=None),
        presentation_context(1, None),
        presentation_context(1, CT_IMAGE_STORAGE.encode())
        + presentation_context(1, VERIFICATION.encode()),
    ],
    ids=["no transfer syntax", "no abstract syntax", "repeated context ID"],
)
def test_a_malformed_presentation_context_is_aborted_and_keeps_no_association_slot(
    receiver: Receiver, contexts: bytes
) -> None:
    request = association_request("MALFORMED", contexts=contexts)
    for _ in range(3):  # more than max_associations (1)
        assert answer_to(receiver.port, request) == a_abort(6)
    associate(receiver.port, ct_slice()).release()


@pytest.mark.parametrize("check", [False, True], ids=["any called AE", "checked"])
def test_the_called_ae_title_is_checked_when_asked(tmp_path: Path, check: bool) -> None:
    with running_receiver(tmp_path, check_called_ae_title=check) as node:
        with raw_connection(node.port) as connection:
            connection.sendall(association_request("SENDER", called_ae="ELSEWHERE"))
            pdu_type, body = read_pdu(connection)
            if check:
                # A-ASSOCIATE-RJ: permanent, by the service user, called AE title not recognized.
                assert (pdu_type, body) == (0x03, bytes([0, 1, 1, 7]))
            else:
                assert pdu_type == 0x02  # A-ASSOCIATE-AC
                connection.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                assert read_pdu(connection)[0] == 0x06  # A-RELEASE-RP
        associate(node.port, ct_slice()).release()  # calling PACSNODE is always accepted


def test_an_a_abort_instead_of_a_request_is_answered_by_closing(receiver: Receiver) -> None:
    assert answer_to(receiver.port, a_abort(0)) == b""


@pytest.mark.parametrize("pdu_type", [0x08, 0xFF])
def test_an_unknown_pdu_type_is_aborted_as_unrecognized(receiver: Receiver, pdu_type: int) -> None:
    pdu = bytes([pdu_type, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    assert answer_to(receiver.port, pdu) == a_abort(1)
    assert abort_after(receiver.port, pdu) == a_abort(1)


def test_a_tls_handshake_trickled_past_the_acse_timeout_is_closed(tmp_path: Path) -> None:
    """ARTIM covers the TLS handshake too: a peer that sends its ClientHello a byte at a
    time is closed ACSE_TIMEOUT after it connected (CPython's do_handshake takes the
    socket's timeout for the whole handshake, not for each read)."""
    certificates = make_certificates(tmp_path / "tls")
    tls = TlsSettings(
        certificate=certificates.server_certificate, private_key=certificates.server_key
    )
    # A handshake record announcing 512 bytes: the TLS library reads all of it first.
    record = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]) + bytes(511)
    with running_receiver(tmp_path, tls=tls) as node, raw_connection(node.port) as connection:
        started = time.monotonic()
        closed = False
        for byte in record:
            if time.monotonic() - started > ACSE_TIMEOUT + 3:
                break
            try:
                connection.sendall(bytes([byte]))
                if select.select([connection], [], [], 0.1)[0]:
                    closed = connection.recv(16) == b""
                    break
            except ConnectionResetError:
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed, f"still open after {elapsed:.1f} s"
    assert elapsed < ACSE_TIMEOUT + 1


def test_a_request_trickled_past_the_acse_timeout_is_closed(receiver: Receiver) -> None:
    """ARTIM runs from the connection to the whole request, not from byte to byte."""
    request = association_request("TRICKLE")  # ~130 bytes: 13 s at this pace
    with raw_connection(receiver.port) as connection:
        started = time.monotonic()
        for byte in request:
            connection.sendall(bytes([byte]))
            readable, _, _ = select.select([connection], [], [], 0.1)
            if readable:
                assert connection.recv(16) == b""  # closed, with no A-ABORT (AA-2)
                break
        else:
            pytest.fail("the node read the whole trickled request")
        assert ACSE_TIMEOUT <= time.monotonic() - started < ACSE_TIMEOUT + 1.0
    associate(receiver.port, ct_slice()).release()


def test_connections_that_never_associate_are_limited(receiver: Receiver) -> None:
    # Four per association allowed: the fifth silent connection is closed at once.
    idle = [raw_connection(receiver.port) for _ in range(4)]
    try:
        with raw_connection(receiver.port) as fifth:
            fifth.settimeout(1.0)
            assert fifth.recv(1) == b""
    finally:
        for connection in idle:
            connection.close()
    time.sleep(0.2)  # the node sees them close
    associate(receiver.port, ct_slice()).release()


def test_a_burst_of_connections_is_queued_by_the_kernel(receiver: Receiver) -> None:
    # A backlog of 5 made most of 30 simultaneous connections wait ~1 s for a
    # retransmitted SYN.
    started = time.monotonic()
    connections = []
    try:
        for _ in range(40):
            connection = socket.socket()
            connection.setblocking(False)
            connection.connect_ex(("127.0.0.1", receiver.port))
            connections.append(connection)
        for connection in connections:
            connection.setblocking(True)
            connection.settimeout(5)
            connection.getpeername()  # raises until connected
            assert connection.send(b"") == 0
        assert time.monotonic() - started < 0.9
    finally:
        for connection in connections:
            connection.close()


# --- fixed-length and empty PDUs -----------------------------------------------------


@pytest.mark.parametrize("pdu_type", [0x05, 0x07])
def test_a_huge_release_or_abort_length_is_not_read(receiver: Receiver, pdu_type: int) -> None:
    # A 4 GiB body announced: refused (A-RELEASE-RQ) or closed on (A-ABORT) unread.
    pdu = struct.pack(">BxL", pdu_type, 0xFFFFFFFF)
    assert abort_after(receiver.port, pdu) == (a_abort(6) if pdu_type == 0x05 else b"")


def test_a_release_request_of_the_wrong_length_is_aborted(receiver: Receiver) -> None:
    assert abort_after(receiver.port, bytes([0x05, 0, 0, 0, 0, 0])) == a_abort(6)


def test_a_p_data_without_a_pdv_is_aborted(receiver: Receiver) -> None:
    assert abort_after(receiver.port, bytes([0x04, 0, 0, 0, 0, 0])) == a_abort(6)


# --- requests and their presentation context --------------------------------------


def test_a_command_fragmented_across_two_contexts_is_aborted(receiver: Receiver) -> None:
    contexts = presentation_context(1, CT_IMAGE_STORAGE.encode()) + presentation_context(
        3, VERIFICATION.encode()
    )
    command = command_set(0x0030, VERIFICATION)
    with associated(receiver.port, contexts) as connection:
        connection.sendall(p_data(3, 0x01, command[:20]) + p_data(1, 0x03, command[20:]))
        assert closed_by_peer(connection) == a_abort(6)


def test_a_c_echo_on_a_storage_context_is_refused(receiver: Receiver) -> None:
    with associated(receiver.port) as connection:
        connection.sendall(p_data(1, 0x03, command_set(0x0030, VERIFICATION)))
        assert response_status(connection) == 0x0122


def test_a_c_store_of_another_sop_class_than_its_context_is_refused(
    tmp_path: Path, receiver: Receiver
) -> None:
    dataset = ct_slice()
    dataset.SOPClassUID = MR_IMAGE_STORAGE
    dataset.Modality = "MR"
    body = encoded(dataset)
    with associated(receiver.port) as connection:  # context 1: CT Image Storage
        command = command_set(0x0001, MR_IMAGE_STORAGE, str(dataset.SOPInstanceUID))
        connection.sendall(p_data(1, 0x03, command) + p_data(1, 0x02, body))
        assert response_status(connection) == 0x0122
    assert not list((tmp_path / "var" / "instances").rglob("*.dcm"))
