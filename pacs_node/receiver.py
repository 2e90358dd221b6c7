"""The node's Storage SCP: which associations to accept, and C-STORE made durable.

The network edge is this module, `acceptor` (the upper layer) and `sender`.
A C-STORE is answered Success only after the received bytes are fsynced at
their final path and the instance row is committed; every other outcome gets
the specific status of the Storage Service Class (PS3.4 B.2.3) and a log line
saying why. Nothing here raises into the acceptor.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom.presentation import AllStoragePresentationContexts

from models.pixel_layout import pixel_layout
from pacs_node.acceptor import (
    Acceptor,
    AcceptorSettings,
    Association,
    DataSetSink,
    Status,
    StoreRequest,
    listen,
)
from pacs_node.association_slots import AssociationSlots
from pacs_node.config import DicomSettings, IntakeSettings, TlsSettings
from pacs_node.errors import (
    BadInstanceError,
    ConfigurationError,
    DatasetMismatchError,
    StoreUnavailableError,
)
from pacs_node.header import inflated_size, read_header
from pacs_node.intake import InstanceInfo, check_complete, describe
from pacs_node.storage import IncomingFile, ReceivedFile, Storage
from pacs_node.store import InstanceOutcome, JobStore, NewInstance

log = logging.getLogger(__name__)

# Stored exactly as received; decoded only when the instance is classified.
ACCEPTED_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]

VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Header values longer than this are left on disk when describing an instance.
DEFER_BYTES = 4096
# Deflate compresses whole data sets, not pixel data: meant for reports and small
# objects. Reading one holds it inflated in memory, so this bounds what it may become.
MAXIMUM_INFLATED_BYTES = 256 * 1024 * 1024
# Offered to peers: a CT slice then arrives in one P-DATA-TF, not dozens.
MAXIMUM_PDU_BYTES = 4 * 1024 * 1024


@dataclass
class _AssociationState:
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    # (series, reason) pairs already logged, so a 500-image MR series gives one line.
    reported_exclusions: set[tuple[str, str]] = field(default_factory=set)
    # The file for the next data set, made ahead. It lives at most as long as the
    # association, which closes after network_timeout of silence, far below the
    # age at which incoming/ is swept.
    next_file: Future[IncomingFile] | None = None


def listen_on(dicom: DicomSettings) -> socket.socket:
    """The listening socket of dicom.bind and dicom.port, or a `ConfigurationError`."""
    try:
        return listen(dicom.bind, dicom.port)
    except OSError as error:
        raise ConfigurationError(
            f"cannot listen on {dicom.bind}:{dicom.port}: {error.strerror}"
        ) from error


class Receiver:
    """The node's C-STORE SCP: what to accept, where it goes, what to answer."""

    def __init__(
        self,
        dicom: DicomSettings,
        intake: IntakeSettings,
        storage: Storage,
        store: JobStore,
        admit: Callable[[], str | None] = lambda: None,
        series_filled: Callable[[], None] = lambda: None,
        on_store: Callable[[], None] = lambda: None,
    ) -> None:
        self.dicom = dicom
        self.intake = intake
        self.storage = storage
        self.store = store
        # Returns a reason to refuse new data (back-pressure), or None.
        self.admit = admit
        # Called when a series holds as many classifiable instances as they say
        # it has (ImagesInAcquisition): it may be complete by content now.
        self.series_filled = series_filled
        # Called as each C-STORE begins (the infer process gives way to receiving).
        self.on_store = on_store
        self._acceptor: Acceptor | None = None
        self._associations: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        # Where received headers are read while their association's thread syncs the
        # file. It outlives stop(): an association cut by stop() may still be finishing.
        self._readers = ThreadPoolExecutor(
            min(dicom.max_associations, 8), thread_name_prefix="header"
        )

    def start(
        self, listener: socket.socket | None = None, slots: AssociationSlots | None = None
    ) -> None:
        """Accept from `listener`, or from a new one on dicom.bind and dicom.port;
        `slots`: dicom.max_associations shared with other receiving processes."""
        settings = AcceptorSettings(
            called_ae_title=self.dicom.ae_title if self.dicom.check_called_ae_title else None,
            max_associations=self.dicom.max_associations,
            acse_timeout_seconds=self.dicom.acse_timeout_seconds,
            network_timeout_seconds=self.dicom.network_timeout_seconds,
            maximum_pdu_bytes=MAXIMUM_PDU_BYTES,
            tls=tls_context(self.dicom.tls),
        )
        contexts = [
            (sop_class, ACCEPTED_TRANSFER_SYNTAXES)
            for sop_class in [VERIFICATION, *_storage_sop_classes()]
        ]
        acceptor = Acceptor(settings, self, contexts, slots)
        acceptor.start(listener or listen_on(self.dicom))
        self._acceptor = acceptor

    def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.stop()
            self._acceptor = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._acceptor is None:
            raise RuntimeError("the receiver is not running")
        return self._acceptor.port

    # --- associations -----------------------------------------------------------

    def refusal(self, calling_ae: str, address: str) -> str | None:
        allowed = self.dicom.allowed_calling_aes
        if allowed and calling_ae not in allowed:
            return "calling AE title is not in dicom.allowed_calling_aes"
        networks = self.dicom.allowed_addresses.get(calling_ae)
        if networks is not None and not any(
            ipaddress.ip_address(address) in network for network in networks
        ):
            return "address not allowed for this calling AE"
        return None

    def opened(self, association: Association) -> None:
        with self._lock:
            self._associations[id(association)] = _AssociationState()
        context = {"peer_ae": association.calling_ae, "peer": _peer(association)}
        log.info("association established", extra={"action": "associate", **context})
        if association.rejected_abstract_syntaxes:
            log.warning(
                "presentation contexts rejected",
                extra={
                    "action": "associate",
                    "reason": "abstract syntax not supported: "
                    + ", ".join(association.rejected_abstract_syntaxes),
                    **context,
                },
            )

    def closed(self, association: Association, how: str, reason: str) -> None:
        with self._lock:
            state = self._associations.pop(id(association), _AssociationState())
        if state.next_file is not None:
            with contextlib.suppress(OSError):  # not even created: nothing to remove
                state.next_file.result().discard()
        extra = {"action": how, "peer_ae": association.calling_ae, "peer": _peer(association)}
        if reason:
            extra["reason"] = reason
        log.info(
            f"association {how}: {state.stored} stored, {state.duplicates} duplicate, "
            f"{state.failed} refused",
            extra=extra,
        )

    # --- C-STORE ------------------------------------------------------------------

    def prepare_store(self, request: StoreRequest, header: bytes) -> DataSetSink | Status:
        self.on_store()
        if request.sop_class_uid != request.abstract_syntax:
            # The SOP class the association negotiated for this context is the one
            # its requests may store (PS3.8 7.1.1.13); pynetdicom answers the same.
            reason = (
                f"SOP class {request.sop_class_uid} sent on the presentation context "
                f"for {request.abstract_syntax}"
            )
            return self._counted(
                request,
                self._refuse(SOP_CLASS_NOT_SUPPORTED, reason, request.association.calling_ae),
            )
        refusal = self.admit()
        if refusal is not None:
            log.warning(
                "C-STORE refused: out of resources",
                extra={
                    "action": "store",
                    "peer_ae": request.association.calling_ae,
                    "reason": refusal,
                },
            )
            return self._counted(request, Status(OUT_OF_RESOURCES, refusal))
        try:
            return _InstanceSink(self, request, self._incoming_file(request, header))
        except OSError as error:
            return self._counted(request, self._storage_failure(request, error))

    def _incoming_file(self, request: StoreRequest, header: bytes) -> IncomingFile:
        """The association's file made ahead (or a new one), and the next made ahead."""
        with self._lock:
            state = self._state(request.association)
            ready, state.next_file = state.next_file, self.storage.incoming_file_ahead()
        if ready is None:
            return self.storage.incoming_file(header)
        return ready.result().start(header)

    def read_received(self, path: Path, size: int, transfer_syntax: str) -> Future[ReadInstance]:
        """Read a received data set's header (see `read_instance`) on another thread."""
        return self._readers.submit(read_instance, path, size, transfer_syntax, self.intake)

    def store_received(
        self, request: StoreRequest, received: ReceivedFile, reading: Future[ReadInstance]
    ) -> Status:
        """Store one received, synced instance whose header `reading` reads; every path
        returns a status, none raises."""
        peer_ae = request.association.calling_ae
        try:
            status = self._store(request, received, reading)
        except Exception:  # the acceptor must go on serving whatever happens here
            log.exception(
                "C-STORE failed unexpectedly", extra={"action": "store", "peer_ae": peer_ae}
            )
            status = Status(CANNOT_UNDERSTAND, "internal error while storing")
        if status.code != SUCCESS:
            # Refused or failed: keep no file no row refers to (a no-op once adopted).
            received.path.unlink(missing_ok=True)
        return self._counted(request, status)

    def _store(
        self, request: StoreRequest, received: ReceivedFile, reading: Future[ReadInstance]
    ) -> Status:
        """Commit the row while the file's folder syncs: Success is answered only when
        both are done. A crash between the commit and the folder's sync can leave a row
        whose file is missing; the peer had no Success for it, and its resend lands on
        the same name again."""
        peer_ae = request.association.calling_ae
        try:
            instance = reading.result()
            info = instance.info
            if (info.sop_class_uid, info.sop_instance_uid) != (
                request.sop_class_uid,
                request.sop_instance_uid,
            ):
                raise DatasetMismatchError("SOP class/instance UID differ from the request")
            placing = self.storage.adopt_instance(
                info.study_instance_uid,
                info.series_instance_uid,
                info.sop_instance_uid,
                received,
            )
            written = placing.value
            recorded = self.store.record_instance(
                NewInstance(
                    sop_instance_uid=info.sop_instance_uid,
                    sop_class_uid=info.sop_class_uid,
                    series_instance_uid=info.series_instance_uid,
                    study_instance_uid=info.study_instance_uid,
                    modality=info.modality,
                    transfer_syntax_uid=request.transfer_syntax_uid,
                    path=written.relative_path,
                    size=written.size,
                    sha256=written.sha256,
                    calling_ae=peer_ae,
                    received_at=datetime.now(timezone.utc),
                    instance_number=info.instance_number,
                    images_in_acquisition=info.images_in_acquisition,
                    classifiable=info.classifiable,
                    exclusion_reason=info.exclusion_reason,
                    pixel_layout=instance.pixel_layout,
                )
            )
            placing.wait()
        except DatasetMismatchError as error:
            return self._refuse(DATASET_MISMATCH, str(error), peer_ae)
        except BadInstanceError as error:
            return self._refuse(CANNOT_UNDERSTAND, str(error), peer_ae)
        except StoreUnavailableError as error:
            return self._refuse(OUT_OF_RESOURCES, str(error), peer_ae)
        except OSError as error:
            return self._storage_failure(request, error)
        except Exception as error:  # pydicom raises many kinds on malformed data
            return self._refuse(
                CANNOT_UNDERSTAND, f"cannot decode data set: {type(error).__name__}", peer_ae
            )
        if recorded.replaced_path is not None:
            # Committed: no row refers to the replaced object's file any more.
            self.storage.remove(recorded.replaced_path)
        self._count(request, info.series_instance_uid, recorded.outcome, info.exclusion_reason)
        stated = info.images_in_acquisition
        if info.classifiable and stated is not None and recorded.classifiable_in_series == stated:
            self.series_filled()
        return Status(SUCCESS)

    def _state(self, association: Association) -> _AssociationState:
        """The association's state; the caller holds `_lock`."""
        return self._associations.setdefault(id(association), _AssociationState())

    def _storage_failure(self, request: StoreRequest, error: OSError) -> Status:
        return self._refuse(
            OUT_OF_RESOURCES,
            f"cannot write to storage: {error.strerror}",
            request.association.calling_ae,
        )

    def _refuse(self, status: int, reason: str, peer_ae: str) -> Status:
        log.warning(
            f"C-STORE refused with 0x{status:04X}",
            extra={
                "action": "store",
                "peer_ae": peer_ae,
                "status": f"0x{status:04X}",
                "reason": reason,
            },
        )
        return Status(status, reason)

    def _counted(self, request: StoreRequest, status: Status) -> Status:
        if status.code != SUCCESS:
            with self._lock:
                self._state(request.association).failed += 1
        return status

    def _count(
        self,
        request: StoreRequest,
        series_uid: str,
        outcome: InstanceOutcome,
        exclusion: str | None,
    ) -> None:
        peer_ae = request.association.calling_ae
        with self._lock:
            state = self._state(request.association)
            if outcome is InstanceOutcome.IDENTICAL:
                state.duplicates += 1
            else:
                state.stored += 1
            first_exclusion = (
                exclusion is not None and (series_uid, exclusion) not in state.reported_exclusions
            )
            if first_exclusion and exclusion is not None:
                state.reported_exclusions.add((series_uid, exclusion))
        if outcome is InstanceOutcome.CHANGED:
            log.warning(
                "instance replaced by a different object with the same SOP Instance UID",
                extra={"action": "store", "peer_ae": peer_ae, "series_uid": series_uid},
            )
        if first_exclusion:
            log.info(
                "instances stored, not classified",
                extra={
                    "action": "store",
                    "peer_ae": peer_ae,
                    "series_uid": series_uid,
                    "reason": exclusion,
                },
            )


class _InstanceSink:
    """A data set streamed into incoming/; a write error is answered once it has all arrived."""

    def __init__(self, receiver: Receiver, request: StoreRequest, file: IncomingFile) -> None:
        self.receiver = receiver
        self.request = request
        self.file = file
        self.error: OSError | None = None

    def write(self, fragment: memoryview) -> None:
        if self.error is None:
            try:
                self.file.write(fragment)
            except OSError as error:
                self.error = error  # the rest is read and dropped

    def finish(self) -> Status:
        if self.error is not None:
            self.file.discard()
            return self._failed(self.error)
        # This thread syncs the file, which lets go of the GIL at once, while
        # another reads its header: neither waits for the other to start
        # (ingest 1.15x syncing on another thread and parsing here: tests/benchmarks/README.md).
        reading = self.receiver.read_received(
            self.file.path, self.file.size, self.request.transfer_syntax_uid
        )
        try:
            received = self.file.finish()  # removes the file if the sync fails
        except OSError as error:
            return self._failed(error)
        return self.receiver.store_received(self.request, received, reading)

    def _failed(self, error: OSError) -> Status:
        return self.receiver._counted(
            self.request, self.receiver._storage_failure(self.request, error)
        )

    def discard(self) -> None:
        self.file.discard()


def _storage_sop_classes() -> list[str]:
    return [
        str(context.abstract_syntax)
        for context in AllStoragePresentationContexts
        if context.abstract_syntax is not None
    ]


def tls_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The server side of DICOM TLS, or None when TLS is off."""
    if settings.certificate is None or settings.private_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # BCP 195 (PS3.15 B.9): TLS 1.2 or newer.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.certificate, settings.private_key)
        if settings.client_ca is not None:
            context.load_verify_locations(settings.client_ca)
            context.verify_mode = (
                ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
            )
    except (OSError, ssl.SSLError) as error:
        raise ConfigurationError(f"dicom.tls: cannot load certificates: {error}") from error
    return context


def _peer(association: Association) -> str:
    return f"{association.address}:{association.port}"


@dataclass(frozen=True)
class ReadInstance:
    """What the receiver takes from a received data set's header."""

    info: InstanceInfo
    # Where its words lie, for the infer stage (None: it parses the file).
    pixel_layout: str | None


def read_instance(
    path: Path, size: int, transfer_syntax: str, intake: IntakeSettings
) -> ReadInstance:
    """Read a received data set of `size` bytes at `path`: its header only (values
    over DEFER_BYTES, the pixel data, stay on disk), checked and described; raises
    as `check_complete` and `describe` do, or as pydicom does on malformed data."""
    if transfer_syntax == uid.DeflatedExplicitVRLittleEndian:
        # Positions then count in the inflated data set, which pydicom holds whole.
        size = inflated_size(path, MAXIMUM_INFLATED_BYTES)
    try:
        dataset = read_header(path, DEFER_BYTES)
    except OSError as error:
        if error.errno is not None:
            raise  # the disk failed: a storage failure
        # pydicom's word for a data set that ends inside a sequence, say.
        raise BadInstanceError(f"cannot decode data set: {error}") from error
    check_complete(dataset, size)
    info = describe(dataset, intake)
    return ReadInstance(info, _layout_text(dataset) if info.classifiable else None)


def _layout_text(dataset: Dataset) -> str | None:
    """Where the instance's words lie, for the infer stage (None: it parses the file)."""
    layout = pixel_layout(dataset)
    return None if layout is None else layout.to_text()
