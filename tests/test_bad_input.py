"""Bad input, one kind per test: the answer the peer gets, the log line that says
why, and the node still serving a good sender that runs the whole time."""

from __future__ import annotations

import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import AE

from tests.bad_input import (
    as_class,
    association_request,
    begin_store,
    closed_by_peer,
    ct_slice,
    deflated,
    encoded,
    raw_connection,
    raw_file,
    resized,
    send_file_status,
    with_name,
)
from tests.dicom_data import renamed_series
from tests.peers import chest_ct, dcmtk_environment, tool
from tests.polling import wait_for
from tests.processes import NodeProcess, StoreSCP
from tests.scu import associate, store_status, store_statuses

ALLOWED = ["PYNETDICOM", "GOOD", "ECHOSCU", "STORESCU"]
NETWORK_TIMEOUT = 4


class GoodSender(threading.Thread):
    """A well-behaved PACS sending CT slices over one association the whole time."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.statuses: list[int] = []
        self.running = threading.Event()
        self.running.set()

    def run(self) -> None:
        template = ct_slice(3)
        association = associate(self.port, template, calling_ae="GOOD")
        while self.running.is_set():
            template.SOPInstanceUID = generate_uid()
            self.statuses.append(int(association.send_c_store(template).Status))
            time.sleep(0.2)
        association.release()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("bad-input")
    with (
        StoreSCP(folder / "destination") as destination,
        NodeProcess(
            folder / "node",
            tiny_model,
            destinations=[("DEST", destination.port)],
            settings={
                "PACS_NODE_DICOM__ALLOWED_CALLING_AES": str(ALLOWED).replace("'", '"'),
                "PACS_NODE_DICOM__ACSE_TIMEOUT_SECONDS": str(NETWORK_TIMEOUT),
                "PACS_NODE_DICOM__NETWORK_TIMEOUT_SECONDS": str(NETWORK_TIMEOUT),
            },
        ) as running,
    ):
        sender = GoodSender(running.port)
        sender.start()
        yield running
        sender.running.clear()
        sender.join(timeout=60)
        # The good sender was served throughout: every one of its instances stored.
        assert len(sender.statuses) > 5 and set(sender.statuses) == {0}


def logged(node: NodeProcess, text: str) -> None:
    wait_for(lambda: node.has_logged(text), 15, f"the log line {text!r}")


def stored(node: NodeProcess, sop_uid: str) -> bool:
    return any((node.storage_root / "instances").rglob(f"{sop_uid}.*.dcm"))


# --- data sets that contradict themselves or their SOP class: 0xA900 -------------


def _no_pixel_data(dataset: Dataset) -> Dataset:
    del dataset.PixelData
    return dataset


def _no_rows(dataset: Dataset) -> Dataset:
    del dataset.Rows
    return dataset


def _short_pixel_data(dataset: Dataset) -> Dataset:
    dataset.PixelData = dataset.PixelData[:-1024]
    return dataset


REFUSED_0XA900: dict[str, tuple[Callable[[Dataset], Dataset], str]] = {
    "CT image without pixel data": (_no_pixel_data, "image instance has no pixel data"),
    "MR image without pixel data": (
        lambda d: _no_pixel_data(as_class(d, MRImageStorage, "MR")),
        "image instance has no pixel data",
    ),
    "image without Rows": (_no_rows, "image instance lacks Rows"),
    "pixel data shorter than the header says": (_short_pixel_data, "pixel data is 523264 bytes"),
}


@pytest.mark.parametrize("case", REFUSED_0XA900)
def test_data_set_contradicting_its_sop_class_gets_0xa900(node: NodeProcess, case: str) -> None:
    change, reason = REFUSED_0XA900[case]
    dataset = change(ct_slice())
    assert store_status(node.port, dataset) == 0xA900
    logged(node, reason)
    assert not stored(node, dataset.SOPInstanceUID)


# --- instances that are stored but never classified: Success ---------------------


def _image_type(dataset: Dataset, value: str) -> Dataset:
    dataset.ImageType = ["ORIGINAL", "PRIMARY", value]
    return dataset


NOT_CLASSIFIED: dict[str, tuple[Callable[[Dataset], Dataset], str]] = {
    "MR image": (lambda d: as_class(d, MRImageStorage, "MR"), "modality MR is not classified"),
    "structured report": (
        lambda d: as_class(d, ComprehensiveSRStorage, "SR"),
        "modality SR is not classified",
    ),
    "segmentation": (
        lambda d: as_class(d, SegmentationStorage, "SEG"),
        "modality SEG is not classified",
    ),
    "secondary capture": (
        lambda d: as_class(d, SecondaryCaptureImageStorage, "OT"),
        "modality OT is not classified",
    ),
    "CT localizer": (
        lambda d: _image_type(d, "LOCALIZER"),
        "image type LOCALIZER is not classified",
    ),
    "enhanced (multi-frame) CT": (
        lambda d: as_class(d, EnhancedCTImageStorage, "CT"),
        f"SOP class {EnhancedCTImageStorage} is not classified",
    ),
}


@pytest.mark.parametrize("case", NOT_CLASSIFIED)
def test_other_objects_are_stored_but_not_classified(node: NodeProcess, case: str) -> None:
    change, reason = NOT_CLASSIFIED[case]
    dataset = change(ct_slice())
    assert store_status(node.port, dataset) == 0x0000
    logged(node, f"series_uid={dataset.SeriesInstanceUID} reason={reason}")
    assert stored(node, dataset.SOPInstanceUID)


def test_pixel_data_longer_than_the_header_says_is_stored(node: NodeProcess) -> None:
    dataset = ct_slice()
    dataset.PixelData = dataset.PixelData + b"\0" * 1024
    assert store_status(node.port, dataset) == 0x0000
    assert stored(node, dataset.SOPInstanceUID)


# --- character sets: stored and classified, names intact --------------------------

CHARACTER_SETS = {
    "ISO_IR 100": "Müller^Jürgen",
    "ISO_IR 192": "Nguyễn^Văn",
    "GB18030": "王^小明",
}


@pytest.mark.parametrize("character_set", CHARACTER_SETS)
def test_specific_character_sets_are_kept_byte_for_byte(
    node: NodeProcess, character_set: str
) -> None:
    dataset = with_name(ct_slice(), character_set, CHARACTER_SETS[character_set])
    assert store_status(node.port, dataset) == 0x0000
    (path,) = (node.storage_root / "instances").rglob(f"{dataset.SOPInstanceUID}.*.dcm")
    assert str(pydicom.dcmread(path).PatientName) == CHARACTER_SETS[character_set]


def test_an_unknown_character_set_is_stored_and_says_so_nowhere_at_info(node: NodeProcess) -> None:
    dataset = ct_slice()
    dataset.SpecificCharacterSet = "ISO_IR 999"
    dataset.PatientName = "Unknown^Charset"
    assert store_status(node.port, dataset) == 0x0000
    assert stored(node, dataset.SOPInstanceUID)
    assert not node.has_logged("Unknown^Charset")


# --- UIDs: invalid, hostile, or contradicting the request: 0xC000 / 0xA900 ------


def _uid_case(keyword: str, value: str | None) -> Callable[[Dataset], Dataset]:
    def change(dataset: Dataset) -> Dataset:
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
        return dataset

    return change


UID_CASES: dict[str, tuple[Callable[[Dataset], Dataset], int, str]] = {
    "SOP Instance UID with letters": (
        _uid_case("SOPInstanceUID", "1.2.3.abc"),
        0xC000,
        "SOPInstanceUID is not a valid UID",
    ),
    "Series UID escaping the storage folder": (
        _uid_case("SeriesInstanceUID", "../../../etc"),
        0xC000,
        "SeriesInstanceUID is not a valid UID",
    ),
    "Study UID longer than 64 characters": (
        _uid_case("StudyInstanceUID", "1." + "2" * 70),
        0xC000,
        "StudyInstanceUID is not a valid UID",
    ),
    "missing Study Instance UID": (
        _uid_case("StudyInstanceUID", None),
        0xC000,
        "StudyInstanceUID is missing",
    ),
    "missing Series Instance UID": (
        _uid_case("SeriesInstanceUID", None),
        0xC000,
        "SeriesInstanceUID is missing",
    ),
}


@pytest.mark.parametrize("case", UID_CASES)
def test_bad_uids_are_refused(node: NodeProcess, tmp_path: Path, case: str) -> None:
    change, status, reason = UID_CASES[case]
    original = ct_slice()
    dataset = change(ct_slice())
    path = raw_file(
        tmp_path / "bad.dcm", original.SOPClassUID, original.SOPInstanceUID, encoded(dataset)
    )
    assert send_file_status(node.port, path) == status
    logged(node, reason)
    assert not list((node.storage_root / "instances").rglob("*etc*"))


def test_a_data_set_of_another_sop_class_than_its_context_gets_0xa900(
    node: NodeProcess, tmp_path: Path
) -> None:
    dataset = ct_slice()
    path = raw_file(tmp_path / "x.dcm", MRImageStorage, dataset.SOPInstanceUID, encoded(dataset))
    assert send_file_status(node.port, path) == 0xA900
    logged(node, "SOP class/instance UID differ from the request")


# --- undecodable encodings: 0xC000 ------------------------------------------------


def _truncated(body: bytes) -> bytes:
    return body[: len(body) // 2]


UNDECODABLE: dict[str, tuple[Callable[[bytes], bytes], str, int, str]] = {
    "data set truncated in the pixel data": (
        _truncated,
        ExplicitVRLittleEndian,
        0xC000,
        "data set is truncated in element (7FE0,0010)",
    ),
    "data set truncated in its header": (
        lambda body: body[:300],
        ExplicitVRLittleEndian,
        0xC000,
        "StudyInstanceUID is missing",
    ),
    "data set truncated inside a sequence": (
        # pydicom raises OSError, no errno: not a storage failure.
        lambda body: body[: body.index(b"\x08\x00\x40\x11SQ") + 24],
        ExplicitVRLittleEndian,
        0xC000,
        "cannot decode data set: No tag to read",
    ),
    "garbage instead of a data set": (
        lambda body: bytes(range(256)) * 64,
        ExplicitVRLittleEndian,
        0xC000,
        "UID is missing",
    ),
    "deflated syntax with a corrupt stream": (
        lambda body: b"\x00\xff" + deflated(body)[2:5000],
        DeflatedExplicitVRLittleEndian,
        0xC000,
        "deflated data set cannot be inflated",
    ),
}


@pytest.mark.parametrize("case", UNDECODABLE)
def test_undecodable_data_sets_are_refused(node: NodeProcess, tmp_path: Path, case: str) -> None:
    corrupt, syntax, status, reason = UNDECODABLE[case]
    dataset = ct_slice()
    body = corrupt(encoded(dataset))
    path = raw_file(tmp_path / "x.dcm", dataset.SOPClassUID, dataset.SOPInstanceUID, body, syntax)
    assert send_file_status(node.port, path) == status
    logged(node, reason)
    assert not stored(node, dataset.SOPInstanceUID)


# --- deflated data sets: read inflated, within bounds ---------------------------------


def test_a_deflated_instance_is_stored_as_sent(node: NodeProcess, tmp_path: Path) -> None:
    (source,) = renamed_series(chest_ct(), tmp_path / "plain", count=1)
    path = tmp_path / "deflated.dcm"
    subprocess.run([tool("dcmconv"), "+td", str(source), str(path)], check=True, timeout=60)
    sent = subprocess.run(
        [
            *(tool("storescu"), "-xd", "-aet", "STORESCU", "-aec", "PACSNODE"),
            *("127.0.0.1", str(node.port), str(path)),
        ],
        env=dcmtk_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0 and "0xC000" not in sent.stderr, sent.stderr
    sop_uid = pydicom.dcmread(source).SOPInstanceUID
    (stored_file,) = (node.storage_root / "instances").rglob(f"{sop_uid}.*.dcm")
    received = pydicom.dcmread(stored_file)
    assert received.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert received.PixelData == pydicom.dcmread(source).PixelData


def _deflate_bomb(body: bytes) -> bytes:
    """The slice, then a private OB element of 300 MiB of zeros: ~300 KiB deflated."""
    size = 300 << 20
    compressor = zlib.compressobj(wbits=-15)
    parts = [compressor.compress(body + b"\x09\x00\x10\x10OB\0\0" + size.to_bytes(4, "little"))]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(size >> 20)]
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda body: deflated(body)[:-1000], "deflated data set is cut short"),
        (_deflate_bomb, "deflated data set inflates beyond 268435456 bytes"),
    ],
    ids=["cut short", "inflating beyond the bound"],
)
def test_a_deflated_data_set_that_cannot_be_read_whole_is_refused(
    node: NodeProcess, tmp_path: Path, corrupt: Callable[[bytes], bytes], reason: str
) -> None:
    dataset = ct_slice()
    body = corrupt(encoded(dataset))
    path = raw_file(
        tmp_path / "x.dcm",
        dataset.SOPClassUID,
        dataset.SOPInstanceUID,
        body,
        DeflatedExplicitVRLittleEndian,
    )
    assert send_file_status(node.port, path) == 0xC000
    logged(node, reason)
    assert not stored(node, dataset.SOPInstanceUID)


# --- series the classifier must cope with ------------------------------------------


def test_a_series_of_mixed_matrix_sizes_and_orientations_is_classified(
    node: NodeProcess, tmp_path: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "mixed", count=4)
    datasets = [pydicom.dcmread(path) for path in files]
    resized(datasets[1], 256)
    datasets[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal among axials
    assert store_statuses(node.port, *datasets) == [0] * 4
    logged(node, f"series_uid={datasets[0].SeriesInstanceUID}")
    wait_for(
        lambda: (
            node.has_logged("series classified")
            and any(
                f"series_uid={datasets[0].SeriesInstanceUID}" in line and "classified as" in line
                for line in node.lines
            )
        ),
        120,
        "the mixed series to be classified",
    )


# --- the association itself ------------------------------------------------------


def test_an_unknown_calling_ae_is_rejected(node: NodeProcess) -> None:
    refused = AE(ae_title="INTRUDER")
    refused.add_requested_context("1.2.840.10008.1.1")
    association = refused.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    # Its other states, should it ever not be rejected (once, in a loaded CI run).
    assert association.is_rejected, (
        f"established {association.is_established}, aborted {association.is_aborted}; "
        f"node log, last lines: {node.log[-3000:]}"
    )
    logged(node, "peer_ae=INTRUDER")
    logged(node, "calling AE title is not in dicom.allowed_calling_aes")


def test_an_unsupported_abstract_syntax_is_refused_in_negotiation(node: NodeProcess) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context("1.2.3.4.5.6.7")
    ae.add_requested_context("1.2.840.10008.1.1")
    association = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert association.is_established
    assert [str(cx.abstract_syntax) for cx in association.rejected_contexts] == ["1.2.3.4.5.6.7"]
    association.release()
    logged(node, "abstract syntax not supported: 1.2.3.4.5.6.7")


def test_garbage_bytes_on_the_socket_are_dropped(node: NodeProcess) -> None:
    with raw_connection(node.port) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n" * 10)
        answer = closed_by_peer(connection)
    # No association: at most an A-ABORT (PDU type 0x07) before the close.
    assert answer in (b"",) or answer.startswith(b"\x07")


def test_a_malformed_association_request_is_aborted(node: NodeProcess) -> None:
    with raw_connection(node.port) as connection:
        connection.sendall(association_request("PYNETDICOM", pdu_length_error=-7))
        answer = closed_by_peer(connection)
    assert answer == b"" or answer[0] in (0x03, 0x07)  # A-ASSOCIATE-RJ or A-ABORT


def test_a_silent_connection_is_closed_after_the_timeout(node: NodeProcess) -> None:
    started = time.monotonic()
    with raw_connection(node.port) as connection:
        connection.settimeout(NETWORK_TIMEOUT * 5)
        answer = closed_by_peer(connection)
    assert time.monotonic() - started < NETWORK_TIMEOUT * 4
    assert answer == b"" or answer.startswith(b"\x07")


def test_a_peer_silent_in_mid_transfer_is_aborted_and_nothing_is_kept(node: NodeProcess) -> None:
    dataset = ct_slice()
    association = associate(node.port, dataset)
    begin_store(association, dataset, fraction=0.5)
    wait_for(
        lambda: association.is_aborted or not association.is_alive(),
        NETWORK_TIMEOUT * 5,
        "the node to abort the silent association",
    )
    logged(node, "association aborted")
    assert not stored(node, dataset.SOPInstanceUID)


def test_a_peer_aborting_in_mid_transfer_leaves_nothing(node: NodeProcess) -> None:
    dataset = ct_slice()
    association = associate(node.port, dataset)
    begin_store(association, dataset, fraction=0.5)
    association.abort()
    logged(node, "association aborted: 0 stored")
    assert not stored(node, dataset.SOPInstanceUID)


def test_dcmtk_still_gets_through_after_all_of_this(node: NodeProcess, tmp_path: Path) -> None:
    files = renamed_series(chest_ct(), tmp_path / "good", count=2)
    sent = subprocess.run(
        [
            tool("storescu"),
            "-aet",
            "STORESCU",
            "-aec",
            "PACSNODE",
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        env=dcmtk_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    assert all(stored(node, pydicom.dcmread(path).SOPInstanceUID) for path in files)
