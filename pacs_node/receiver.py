"""The DICOM listener: C-ECHO and C-STORE, acknowledged only once durable.

One of the two modules that import pynetdicom (the other is `sender`). A
C-STORE is answered Success only after the received bytes are fsynced at
their final path and the instance row is committed; every other outcome gets
the specific status of the Storage Service Class (PS3.4 B.2.3) and a log line
saying why. Handlers never raise into pynetdicom.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast

from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node.config import DicomSettings, IntakeSettings, TlsSettings
from pacs_node.errors import (
    BadInstanceError,
    ConfigurationError,
    DatasetMismatchError,
    StoreUnavailableError,
)
from pacs_node.intake import check_complete, describe
from pacs_node.storage import Storage
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
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Header values longer than this are left on disk when describing an instance.
DEFER_BYTES = 4096
# Larger PDUs mean fewer Python-level PDU round trips per instance.
MAXIMUM_PDU_BYTES = 4 * 1024 * 1024


@dataclass
class _AssociationTally:
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    # (series, reason) pairs already logged, so a 500-image MR series gives one line.
    reported_exclusions: set[tuple[str, str]] = field(default_factory=set)


class Receiver:
    """Owns the pynetdicom application entity and its server thread."""

    def __init__(
        self,
        dicom: DicomSettings,
        intake: IntakeSettings,
        storage: Storage,
        store: JobStore,
        admit: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.dicom = dicom
        self.intake = intake
        self.storage = storage
        self.store = store
        # Returns a reason to refuse new data (back-pressure), or None.
        self.admit = admit
        self._server: ThreadedAssociationServer | None = None
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        # pynetdicom then streams each data set to a temporary file as its
        # fragments arrive, so no instance is ever held whole in memory. `serve`
        # points the temporary folder at incoming/, on the storage volume, from
        # where the handler renames the file into place without a copy.
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=self.dicom.ae_title)
        ae.maximum_associations = self.dicom.max_associations
        ae.acse_timeout = self.dicom.acse_timeout_seconds
        ae.dimse_timeout = self.dicom.dimse_timeout_seconds
        ae.network_timeout = self.dicom.network_timeout_seconds
        ae.maximum_pdu_size = MAXIMUM_PDU_BYTES
        if self.dicom.allowed_calling_aes:
            ae.require_calling_aet = self.dicom.allowed_calling_aes
        ae.add_supported_context(VERIFICATION)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self._server = ae.start_server(
                (self.dicom.bind, self.dicom.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=tls_context(self.dicom.tls),
            )
        except OSError as error:
            raise ConfigurationError(
                f"cannot listen on {self.dicom.bind}:{self.dicom.port}: {error.strerror}"
            ) from error

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        return int(self._server.server_address[1])

    # --- association events -------------------------------------------------

    def _on_connection(self, event: Event) -> None:
        # pynetdicom reads a PDU's announced length in blocking calls and checks
        # its own timeouts only between PDUs: without a socket timeout, a peer
        # that stops in the middle of a PDU would hold a thread forever.
        transport = event.assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.settimeout(self.dicom.network_timeout_seconds)

    def _on_established(self, event: Event) -> None:
        context = {"peer_ae": _peer_ae(event), "peer": _peer(event)}
        if not self._address_allowed(event):
            log.warning(
                "association aborted: address not allowed for this calling AE",
                extra={"action": "reject", "reason": "dicom.allowed_addresses", **context},
            )
            event.assoc.abort()
            return
        with self._lock:
            self._tallies[id(event.assoc)] = _AssociationTally()
        log.info("association established", extra={"action": "associate", **context})
        rejected = sorted({str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts})
        if rejected:
            log.warning(
                "presentation contexts rejected",
                extra={
                    "action": "associate",
                    "reason": f"abstract syntax not supported: {', '.join(rejected)}",
                    **context,
                },
            )

    def _address_allowed(self, event: Event) -> bool:
        # pynetdicom offers no hook between reading the request and answering
        # it, so an AE calling from the wrong address is aborted right after.
        networks = self.dicom.allowed_addresses.get(_peer_ae(event))
        if networks is None:
            return True
        address = ipaddress.ip_address(event.assoc.requestor.address)
        return any(address in network for network in networks)

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), _AssociationTally())
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info(
            f"association {how}: {tally.stored} stored, {tally.duplicates} duplicate, "
            f"{tally.failed} refused",
            extra={"action": how, "peer_ae": _peer_ae(event), "peer": _peer(event)},
        )

    def _on_rejected(self, event: Event) -> None:
        calling = _peer_ae(event)
        allowed = self.dicom.allowed_calling_aes
        reason = (
            "calling AE title is not in dicom.allowed_calling_aes"
            if allowed and calling not in allowed
            else "association request not acceptable (limits or negotiation)"
        )
        log.warning(
            "association rejected",
            extra={"action": "reject", "peer_ae": calling, "peer": _peer(event), "reason": reason},
        )

    # --- services -------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        log.debug("C-ECHO", extra={"action": "echo", "peer_ae": _peer_ae(event)})
        return SUCCESS

    def _on_store(self, event: Event) -> Dataset:
        """Answer one C-STORE; every path returns a status, none raises."""
        peer_ae = _peer_ae(event)
        try:
            status, comment = self._store(event, peer_ae)
        except Exception:  # a handler must never raise into pynetdicom
            log.exception(
                "C-STORE failed unexpectedly", extra={"action": "store", "peer_ae": peer_ae}
            )
            status, comment = CANNOT_UNDERSTAND, "internal error while storing"
        with self._lock:
            tally = self._tallies.setdefault(id(event.assoc), _AssociationTally())
            if status != SUCCESS:
                tally.failed += 1
        reply = Dataset()
        reply.Status = status
        if comment:
            reply.ErrorComment = comment[:64]
        return reply

    def _store(self, event: Event, peer_ae: str) -> tuple[int, str]:
        refusal = self.admit()
        if refusal is not None:
            log.warning(
                "C-STORE refused: out of resources",
                extra={"action": "store", "peer_ae": peer_ae, "reason": refusal},
            )
            return OUT_OF_RESOURCES, refusal
        try:
            received = event.dataset_path
            # Values over DEFER_BYTES (pixel data) stay on disk: only the header is read.
            dataset = dcmread(received, defer_size=DEFER_BYTES)
            check_complete(dataset, received.stat().st_size)
            info = describe(dataset, self.intake)
            request = cast(C_STORE, event.request)
            request_class = str(request.AffectedSOPClassUID)
            request_instance = str(request.AffectedSOPInstanceUID)
            if (info.sop_class_uid, info.sop_instance_uid) != (request_class, request_instance):
                raise DatasetMismatchError("SOP class/instance UID differ from the request")
            written = self.storage.adopt_instance(
                info.study_instance_uid, info.series_instance_uid, info.sop_instance_uid, received
            )
            recorded = self.store.record_instance(
                NewInstance(
                    sop_instance_uid=info.sop_instance_uid,
                    sop_class_uid=info.sop_class_uid,
                    series_instance_uid=info.series_instance_uid,
                    study_instance_uid=info.study_instance_uid,
                    modality=info.modality,
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    path=written.relative_path,
                    size=written.size,
                    sha256=written.sha256,
                    calling_ae=peer_ae,
                    received_at=datetime.now(timezone.utc),
                    instance_number=info.instance_number,
                    images_in_acquisition=info.images_in_acquisition,
                    classifiable=info.classifiable,
                    exclusion_reason=info.exclusion_reason,
                )
            )
        except DatasetMismatchError as error:
            return self._refuse(DATASET_MISMATCH, str(error), peer_ae)
        except BadInstanceError as error:
            return self._refuse(CANNOT_UNDERSTAND, str(error), peer_ae)
        except StoreUnavailableError as error:
            return self._refuse(OUT_OF_RESOURCES, str(error), peer_ae)
        except OSError as error:
            return self._refuse(
                OUT_OF_RESOURCES, f"cannot write to storage: {error.strerror}", peer_ae
            )
        except Exception as error:  # pydicom raises many kinds on malformed data
            return self._refuse(
                CANNOT_UNDERSTAND, f"cannot decode data set: {type(error).__name__}", peer_ae
            )
        if recorded.replaced_path is not None:
            # Committed: no row refers to the replaced object's file any more.
            self.storage.remove(recorded.replaced_path)
        self._count(
            event, info.series_instance_uid, recorded.outcome, info.exclusion_reason, peer_ae
        )
        return SUCCESS, ""

    def _refuse(self, status: int, reason: str, peer_ae: str) -> tuple[int, str]:
        log.warning(
            f"C-STORE refused with 0x{status:04X}",
            extra={
                "action": "store",
                "peer_ae": peer_ae,
                "status": f"0x{status:04X}",
                "reason": reason,
            },
        )
        return status, reason

    def _count(
        self,
        event: Event,
        series_uid: str,
        outcome: InstanceOutcome,
        exclusion: str | None,
        peer_ae: str,
    ) -> None:
        with self._lock:
            tally = self._tallies.setdefault(id(event.assoc), _AssociationTally())
            if outcome is InstanceOutcome.IDENTICAL:
                tally.duplicates += 1
            else:
                tally.stored += 1
            first_exclusion = (
                exclusion is not None and (series_uid, exclusion) not in tally.reported_exclusions
            )
            if first_exclusion and exclusion is not None:
                tally.reported_exclusions.add((series_uid, exclusion))
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


def _peer_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.address}:{requestor.port}"
