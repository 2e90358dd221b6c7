"""Ways to send a node bad input: crafted data sets, raw files and raw PDUs."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from tests.peers import chest_ct


def ct_slice(index: int = 0) -> Dataset:
    """A real CT slice under new UIDs (a new study and series)."""
    dataset = pydicom.dcmread(sorted(chest_ct().glob("*.dcm"))[index])
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dataset


def as_class(dataset: Dataset, sop_class: str, modality: str) -> Dataset:
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    dataset.Modality = modality
    return dataset


def with_name(dataset: Dataset, character_set: str, name: str) -> Dataset:
    dataset.SpecificCharacterSet = character_set
    dataset.PatientName = name
    return dataset


def resized(dataset: Dataset, size: int) -> Dataset:
    """The same slice with a different matrix (a series of mixed sizes)."""
    step = dataset.Rows // size
    pixels = dataset.pixel_array[::step, ::step]
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    return dataset


def encoded(dataset: Dataset) -> bytes:
    """The data set in explicit VR little endian, as a sender would put it on the wire."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def raw_file(
    path: Path, sop_class: str, sop_instance: str, body: bytes, syntax: str = ExplicitVRLittleEndian
) -> Path:
    """A file whose meta names (`sop_class`, `sop_instance`, `syntax`); its data set: `body`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)
    return path


def deflated(body: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(body) + compressor.flush()


@contextmanager
def sending_files_as_they_are() -> Iterator[None]:
    """pynetdicom then sends a file's bytes without decoding them, UIDs from its meta."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def send_file_status(port: int, path: Path, calling_ae: str = "PYNETDICOM") -> int:
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert association.is_established
    try:
        with sending_files_as_they_are():
            return int(association.send_c_store(path).Status)
    finally:
        association.release()


def raw_connection(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    return connection


def closed_by_peer(connection: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2.1"


def answer_to(port: int, request: bytes) -> bytes:
    with raw_connection(port) as connection:
        connection.sendall(request)
        return closed_by_peer(connection)


def rejection(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])


def presentation_context(
    context_id: int, abstract: bytes | None, transfer: bytes | None = EXPLICIT_VR_LITTLE_ENDIAN
) -> bytes:
    """A Presentation Context item of an A-ASSOCIATE-RQ; None leaves a sub-item out."""
    items = (item(0x30, abstract) if abstract else b"") + (
        item(0x40, transfer) if transfer else b""
    )
    return item(0x20, bytes([context_id, 0, 0, 0]) + items)


def association_request(
    calling_ae: str,
    pdu_length_error: int = 0,
    protocol_version: int = 1,
    application_context_name: bytes = b"1.2.840.10008.3.1.1.1",
    contexts: bytes | None = None,
    called_ae: str = "PACSNODE",
    user_sub_items: bytes = b"",
    last_items: bytes = b"",
) -> bytes:
    """A minimal A-ASSOCIATE-RQ, by default for CT Image Storage (context 1, explicit
    VR little endian); `contexts`: other Presentation Context items; `user_sub_items`
    follow the maximum length in the User Information item, `last_items` follow that item;
    `pdu_length_error` corrupts its length."""
    application_context = item(0x10, application_context_name)
    presentation = contexts or presentation_context(1, CT_IMAGE_STORAGE)
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + user_sub_items)
    body = (
        struct.pack(">HH", protocol_version, 0)
        + called_ae.encode().ljust(16)
        + calling_ae.encode().ljust(16)
        + b"\0" * 32
        + application_context
        + presentation
        + user
        + last_items
    )
    return struct.pack(">BBI", 0x01, 0, len(body) + pdu_length_error) + body


def item(kind: int, value: bytes) -> bytes:
    """An item (or sub-item) of an A-ASSOCIATE PDU: type, reserved byte, length, value."""
    return struct.pack(">BBH", kind, 0, len(value)) + value


def begin_store(association: Association, dataset: Dataset, fraction: float) -> None:
    """Send the C-STORE command and only `fraction` of the data set, then nothing more."""
    context = association._get_valid_context(dataset.SOPClassUID, ExplicitVRLittleEndian, "scu")
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = dataset.SOPClassUID
    request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    request.Priority = 2
    body = encoded(dataset)
    request.DataSet = io.BytesIO(body[: int(len(body) * fraction)])
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = list(message.encode_msg(int(context.context_id or 1), 16384))
    # Everything but the last P-DATA, which would carry the data set's last fragment.
    for primitive in pdus[:-1]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        association.dul.socket.send(pdu.encode())  # type: ignore[union-attr]
