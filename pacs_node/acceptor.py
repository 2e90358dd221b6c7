"""The DICOM upper layer as an association acceptor (PS3.8), for C-ECHO and C-STORE.

Why not pynetdicom's AE server: it runs two threads per association that poll
queues every millisecond and reads PDUs 4 KiB at a time; at half a megabyte
per CT slice that costs about 3 ms of CPU per instance, more than the node's
whole durable write (measured: tests/benchmarks/README.md). Here one thread serves one
association with blocking reads, and a data set's fragments go from the socket
straight into the service's file, never held whole in memory.

pynetdicom still does the intricate parts: it decodes the A-ASSOCIATE-RQ and
encodes the A-ASSOCIATE-AC (`pynetdicom.pdu`) and negotiates the presentation
contexts (`negotiate_as_acceptor`). This module frames PDUs and PDVs (PS3.8
9.3), reads and writes DIMSE command sets (PS3.7 9.3, 10.3, E), and answers
any protocol error with an A-ABORT. No asynchronous operations window is
offered, so a peer sends one request at a time.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from pacs_node import __version__
from pacs_node.association_slots import AssociationSlots

log = logging.getLogger(__name__)

# The node's own implementation identity (PS3.7 D.3.3.2), a fixed 2.25 UID.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:pacs-node').int}"
IMPLEMENTATION_VERSION_NAME = f"PACSNODE_{__version__}"[:16]
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# PDU types (PS3.8 9.3.1).
_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ = 0x01, 0x02, 0x03
_P_DATA, _RELEASE_RQ, _RELEASE_RP, _ABORT = 0x04, 0x05, 0x06, 0x07
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_KNOWN_PDU_TYPES = frozenset(range(_ASSOCIATE_RQ, _ABORT + 1))
# A-RELEASE-RQ, A-RELEASE-RP and A-ABORT carry 4 bytes after their header (PS3.8 9.3.6-9.3.8).
_FIXED_PDU_LENGTH = 4
# A-ABORT provider reasons (PS3.8 9.3.8, Table 9-26).
_NOT_SPECIFIED, _UNRECOGNIZED_PDU, _UNEXPECTED_PDU, _INVALID_PARAMETER = 0x00, 0x01, 0x02, 0x06
# Command fields and the "no data set" marker (PS3.7 E.1).
_C_STORE_RQ, _C_ECHO_RQ, _C_CANCEL_RQ, _RESPONSE = 0x0001, 0x0030, 0x0FFF, 0x8000
_NO_DATA_SET = 0x0101
# "Refused: SOP Class not supported" (PS3.7 C): the request names another SOP class
# than its presentation context's abstract syntax.
_SOP_CLASS_NOT_SUPPORTED = 0x0122
# Bounds on what a peer may make this process hold in memory.
_MAX_REQUEST_BYTES = 1 << 20
_MAX_COMMAND_BYTES = 1 << 16
_READ_BUFFER_BYTES = 1 << 20
# Variable-length values are read in pieces of this size, so that a peer that
# announces a long PDU and sends little costs little memory.
_READ_PIECE_BYTES = 1 << 16
# Connections still to send their A-ASSOCIATE-RQ, per association allowed: beyond
# them a new connection is closed at once, so that a peer cannot hold threads and
# sockets without ever associating.
_WAITING_CONNECTIONS_PER_ASSOCIATION = 4
# The listen backlog: a burst of connections waits here, not for SYN retransmits.
_LISTEN_BACKLOG = 128
# How long a closing connection waits for the peer to close its side.
_CLOSE_WAIT_SECONDS = 2.0


class Status(NamedTuple):
    """A DIMSE status and, for failures, the Error Comment sent with it."""

    code: int
    comment: str = ""


@dataclass(frozen=True)
class Association:
    calling_ae: str
    called_ae: str
    address: str
    port: int
    rejected_abstract_syntaxes: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoreRequest:
    association: Association
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    # The presentation context's: a request for another SOP class is refused.
    abstract_syntax: str


class DataSetSink(Protocol):
    """Where a C-STORE's data set goes, fragment by fragment."""

    def write(self, fragment: memoryview) -> None: ...

    def finish(self) -> Status:
        """The data set is complete: store it and say how that went."""
        ...

    def discard(self) -> None:
        """The transfer broke off: keep nothing."""
        ...


class Service(Protocol):
    def refusal(self, calling_ae: str, address: str) -> str | None:
        """A reason to reject an association request from this peer, or None."""
        ...

    def opened(self, association: Association) -> None: ...

    def closed(self, association: Association, how: str, reason: str) -> None: ...

    def prepare_store(self, request: StoreRequest, header: bytes) -> DataSetSink | Status:
        """A sink for the data set that follows (`header` goes in front), or a refusal."""
        ...


class ProtocolError(Exception):
    """The peer broke PS3.8/PS3.7: the association is aborted."""

    def __init__(self, message: str, reason: int = _UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosedError(Exception):
    """The connection ended where the protocol expected more."""


@dataclass(frozen=True)
class AcceptorSettings:
    # The only Called AE Title accepted; None accepts any.
    called_ae_title: str | None
    max_associations: int
    acse_timeout_seconds: float
    network_timeout_seconds: float
    maximum_pdu_bytes: int
    tls: ssl.SSLContext | None


def listen(bind: str, port: int) -> socket.socket:
    """A listening socket, which several processes' acceptors may share."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind, port))
        listener.listen(_LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


class Acceptor:
    """Accepts connections from a listening socket; one thread per association."""

    def __init__(
        self,
        settings: AcceptorSettings,
        service: Service,
        contexts: Sequence[tuple[str, Sequence[str]]],
        slots: AssociationSlots | None = None,
    ) -> None:
        """`slots`: settings.max_associations shared with other processes, if any."""
        self.settings = settings
        self.service = service
        self.contexts = [build_context(abstract, list(syntaxes)) for abstract, syntaxes in contexts]
        self.slots = slots or AssociationSlots(settings.max_associations)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._waiting = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, listener: socket.socket) -> None:
        """Serve connections from `listener` (see `listen`); stop() closes it."""
        acceptor = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                acceptor._serve_connection(self.request, self.client_address)

        # Non-blocking: when processes race to accept one connection, the losers
        # must go back to waiting, not block in accept(). Set here, in each
        # process: a copy received from another process does not say so.
        listener.setblocking(False)
        self._server = _Server(listener, Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dicom-acceptor", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the acceptor is not listening")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop listening and cut the open connections (their threads then end)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # already closed by the peer
                    connection.shutdown(socket.SHUT_RDWR)

    def _serve_connection(self, raw: socket.socket, address: tuple[str, int]) -> None:
        # ARTIM (PS3.8 9.1.5): the whole A-ASSOCIATE-RQ within the ACSE timeout.
        deadline = time.monotonic() + self.settings.acse_timeout_seconds
        waiting = _WaitingSlot(self)
        if not waiting.taken:
            log.warning(
                "connection closed: too many connections have not associated yet",
                extra={"action": "reject", "peer": _peer(address)},
            )
            raw.close()
            return
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # responses are tiny
            raw.settimeout(self.settings.acse_timeout_seconds)
            connection = self._secure(raw, address)  # with TLS, `raw` is detached from here on
            if connection is None:
                raw.close()
                return
            with self._lock:
                self._connections.add(connection)
            try:
                _AssociationThread(self, connection, address, deadline, waiting.release).run()
            finally:
                with self._lock:
                    self._connections.discard(connection)
                _close(connection)
        finally:
            waiting.release()

    def _secure(self, raw: socket.socket, address: tuple[str, int]) -> socket.socket | None:
        if self.settings.tls is None:
            return raw
        try:
            secured = self.settings.tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.warning(
                "connection dropped: TLS handshake failed",
                extra={"action": "reject", "peer": _peer(address), "reason": str(error)[:200]},
            )
            return None
        return secured

    def _begin_association(self) -> bool:
        return self.slots.take()

    def _end_association(self) -> None:
        self.slots.give_back()


class _WaitingSlot:
    """A connection's place among those that have not associated yet, if it got one."""

    def __init__(self, acceptor: Acceptor) -> None:
        self._acceptor = acceptor
        limit = _WAITING_CONNECTIONS_PER_ASSOCIATION * acceptor.settings.max_associations
        with acceptor._lock:
            self.taken = acceptor._waiting < limit
            if self.taken:
                acceptor._waiting += 1

    def release(self) -> None:
        """Give the place back (once): the connection associated, or ended."""
        with self._acceptor._lock:
            if self.taken:
                self.taken = False
                self._acceptor._waiting -= 1


class _Server(socketserver.ThreadingTCPServer):
    """socketserver's threads, on a socket already listening."""

    daemon_threads = True

    def __init__(
        self, listener: socket.socket, handler: type[socketserver.BaseRequestHandler]
    ) -> None:
        self.address_family = listener.family
        super().__init__(listener.getsockname(), handler, bind_and_activate=False)
        self.socket.close()  # the one socketserver made, unbound
        self.socket = listener


class _Accepted(NamedTuple):
    """An accepted presentation context."""

    abstract_syntax: str
    transfer_syntax: str


@dataclass
class _PendingStore:
    context_id: int
    message_id: int
    request: StoreRequest
    # Where the data set goes, or the refusal to answer once it has been read.
    target: DataSetSink | Status


class _AssociationThread:
    """The acceptor's side of one association, from A-ASSOCIATE-RQ to the close."""

    def __init__(
        self,
        acceptor: Acceptor,
        connection: socket.socket,
        address: tuple[str, int],
        artim_deadline: float,
        negotiated: Callable[[], None],
    ) -> None:
        self.acceptor = acceptor
        self.settings = acceptor.settings
        self.connection = connection
        self.address = address
        self.artim_deadline = artim_deadline
        self.negotiated = negotiated  # called once the request is answered
        self.association: Association | None = None
        self.contexts: dict[int, _Accepted] = {}
        self.peer_maximum_pdu = 0
        self.command = bytearray()
        self.command_context: int | None = None
        self.pending: _PendingStore | None = None
        # Allocated with the first data set: a connection that never associates costs no buffer.
        self.buffer: memoryview | None = None

    def run(self) -> None:
        try:
            associated = self._negotiate()
        except Exception as error:  # whatever the request was, the service goes on
            log.warning(
                "connection dropped before an association",
                extra={"action": "reject", "peer": _peer(self.address), "reason": _why(error)},
            )
            # ARTIM expired, or the peer aborted or left: close only (PS3.8 9.2, AA-2).
            if not isinstance(error, (TimeoutError, PeerClosedError)):
                self._abort(getattr(error, "reason", _NOT_SPECIFIED))
            return
        finally:
            self.negotiated()
        if not associated:
            return
        assert self.association is not None
        self.connection.settimeout(self.settings.network_timeout_seconds)
        how, reason = "aborted", ""
        try:
            self.acceptor.service.opened(self.association)
            how, reason = self._serve_messages()
        except (ProtocolError, PeerClosedError, OSError) as error:
            reason = _why(error)
            self._abort(getattr(error, "reason", _NOT_SPECIFIED))
        except Exception:
            log.exception("association failed unexpectedly", extra={"action": "abort"})
            reason = "internal error"
            self._abort(_NOT_SPECIFIED)
        finally:
            if self.pending is not None and not isinstance(self.pending.target, Status):
                self.pending.target.discard()
            self.acceptor._end_association()
            self.acceptor.service.closed(self.association, how, reason)

    # --- association establishment (PS3.8 7.1) -------------------------------

    def _negotiate(self) -> bool:
        pdu_type, length = self._read_pdu_header(self.artim_deadline)
        if pdu_type == _ABORT:
            raise PeerClosedError("A-ABORT instead of an A-ASSOCIATE-RQ")
        if pdu_type != _ASSOCIATE_RQ:
            raise ProtocolError(
                f"PDU type 0x{pdu_type:02X} instead of A-ASSOCIATE-RQ", _unexpected(pdu_type)
            )
        if length > _MAX_REQUEST_BYTES:
            raise ProtocolError("A-ASSOCIATE-RQ too long", _INVALID_PARAMETER)
        body = self._read_exact(length, self.artim_deadline)
        request = _decode_request(_PDU_HEADER.pack(pdu_type, length) + body)
        calling_ae = request.calling_ae_title.strip()
        supports_version_1 = bool(body[1] & 0x01)
        rejection = self._rejection(request, calling_ae, supports_version_1)
        if rejection is not None:
            result, source, reason, why = rejection
            log.warning(
                "association rejected",
                extra={
                    "action": "reject",
                    "peer_ae": calling_ae,
                    "peer": _peer(self.address),
                    "reason": why,
                },
            )
            self.connection.sendall(
                bytes([_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason])
            )
            return False
        try:  # the association is counted from here: uncount it on any failure
            self.connection.sendall(self._accept(request, calling_ae))
        except BaseException:
            self.acceptor._end_association()
            raise
        return True

    def _rejection(
        self, request: A_ASSOCIATE, calling_ae: str, supports_version_1: bool
    ) -> tuple[int, int, int, str] | None:
        """(result, source, reason, why) of an A-ASSOCIATE-RJ (PS3.8 9.3.4), or None.

        Last of all, the association is counted against dicom.max_associations.
        """
        if not supports_version_1:
            return 1, 2, 2, "protocol version not supported"
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            return 1, 1, 2, "application context name not supported"
        called_ae = request.called_ae_title.strip()
        expected = self.settings.called_ae_title
        if expected is not None and called_ae != expected:
            return 1, 1, 7, f"called AE title {called_ae!r} is not this node's ({expected})"
        refusal = self.acceptor.service.refusal(calling_ae, self.address[0])
        if refusal is not None:
            return 1, 1, 3, refusal
        if not self.acceptor._begin_association():
            return 2, 3, 2, f"dicom.max_associations ({self.settings.max_associations}) reached"
        return None

    def _accept(self, request: A_ASSOCIATE, calling_ae: str) -> bytes:
        """Negotiate the association and encode the A-ASSOCIATE-AC that accepts it."""
        results, _ = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.acceptor.contexts
        )
        self.contexts = {
            int(context.context_id): _Accepted(
                str(context.abstract_syntax), str(context.transfer_syntax[0])
            )
            for context in results
            if context.result == 0 and context.context_id is not None
        }
        self.peer_maximum_pdu = next(
            (
                int(item.maximum_length_received)
                for item in request.user_information
                if isinstance(item, MaximumLengthNotification)
            ),
            0,
        )
        self.association = Association(
            calling_ae=calling_ae,
            called_ae=request.called_ae_title.strip(),
            address=self.address[0],
            port=self.address[1],
            rejected_abstract_syntaxes=tuple(
                sorted({str(cx.abstract_syntax) for cx in results if cx.result != 0})
            ),
        )
        answer = A_ASSOCIATE()
        answer.application_context_name = APPLICATION_CONTEXT
        answer.calling_ae_title = request.calling_ae_title
        answer.called_ae_title = request.called_ae_title
        answer.result = 0
        answer.result_source = 1
        answer.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.settings.maximum_pdu_bytes
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        answer.user_information = [maximum, implementation, version]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(answer)
        return pdu.encode()

    # --- data transfer (PS3.8 9.3.5, PS3.7 9.3) -------------------------------

    def _serve_messages(self) -> tuple[str, str]:
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == _P_DATA:
                self._read_p_data(length)
            elif pdu_type == _RELEASE_RQ:
                if length != _FIXED_PDU_LENGTH:
                    raise ProtocolError(f"A-RELEASE-RQ of length {length}", _INVALID_PARAMETER)
                self._read_exact(length)
                self.connection.sendall(bytes([_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                return "released", ""
            elif pdu_type == _ABORT:
                # Whatever its length says: the connection closes now.
                return "aborted", "A-ABORT from the peer"
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", _unexpected(pdu_type))

    def _read_p_data(self, length: int) -> None:
        if length < _PDV_HEADER.size:
            raise ProtocolError("P-DATA-TF without a PDV", _INVALID_PARAMETER)
        remaining = length
        while remaining:
            if remaining < _PDV_HEADER.size:
                raise ProtocolError("P-DATA-TF ends inside a PDV header", _INVALID_PARAMETER)
            item_length, context_id, control = _PDV_HEADER.unpack(
                self._read_exact(_PDV_HEADER.size)
            )
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError("PDV length beyond its PDU", _INVALID_PARAMETER)
            remaining -= 4 + item_length
            if context_id not in self.contexts:
                raise ProtocolError(
                    f"presentation context {context_id} was not accepted", _INVALID_PARAMETER
                )
            is_command, is_last = bool(control & 0x01), bool(control & 0x02)
            if is_command:
                self._read_command_fragment(context_id, item_length - 2, is_last)
            else:
                self._read_data_set_fragment(context_id, item_length - 2, is_last)

    def _read_command_fragment(self, context_id: int, length: int, is_last: bool) -> None:
        if self.pending is not None:
            raise ProtocolError("a command arrived before the previous data set ended")
        if len(self.command) + length > _MAX_COMMAND_BYTES:
            raise ProtocolError("command set too long", _INVALID_PARAMETER)
        if self.command_context not in (None, context_id):
            raise ProtocolError("a command's fragments on two contexts", _INVALID_PARAMETER)
        self.command_context = context_id
        self.command += self._read_exact(length)
        if is_last:
            command = _decode_command(bytes(self.command))
            self.command.clear()
            self.command_context = None
            self._on_command(context_id, command)

    def _read_data_set_fragment(self, context_id: int, length: int, is_last: bool) -> None:
        pending = self.pending
        if pending is None or pending.context_id != context_id:
            raise ProtocolError("data set fragment without its command")
        if self.buffer is None:
            self.buffer = memoryview(bytearray(_READ_BUFFER_BYTES))
        while length:
            chunk = self.buffer[: min(length, len(self.buffer))]
            received = self.connection.recv_into(chunk)
            if not received:
                raise PeerClosedError("connection closed inside a data set")
            if not isinstance(pending.target, Status):
                pending.target.write(chunk[:received])
            length -= received
        if is_last:
            self.pending = None
            target = pending.target
            status = target if isinstance(target, Status) else target.finish()
            request = pending.request
            self._respond(
                context_id,
                _C_STORE_RQ,
                pending.message_id,
                (request.sop_class_uid, request.sop_instance_uid),
                status,
            )

    def _on_command(self, context_id: int, command: dict[int, bytes]) -> None:
        field = _unsigned(command, 0x0100)
        if field == _C_CANCEL_RQ:
            return  # nothing to cancel: every request here is answered at once
        message_id = _unsigned(command, 0x0110)
        has_data_set = _unsigned(command, 0x0800) != _NO_DATA_SET
        sop_class = _text(command, 0x0002)
        context = self.contexts[context_id]
        assert self.association is not None
        if field == _C_ECHO_RQ and not has_data_set:
            log.debug("C-ECHO", extra={"action": "echo", "peer_ae": self.association.calling_ae})
            status = Status(0)
            if sop_class != context.abstract_syntax:
                status = Status(
                    _SOP_CLASS_NOT_SUPPORTED, f"context {context_id} is not for {sop_class}"
                )
            self._respond(context_id, _C_ECHO_RQ, message_id, (sop_class, None), status)
        elif field == _C_STORE_RQ and has_data_set:
            request = StoreRequest(
                association=self.association,
                sop_class_uid=sop_class,
                sop_instance_uid=_text(command, 0x1000),
                transfer_syntax_uid=context.transfer_syntax,
                abstract_syntax=context.abstract_syntax,
            )
            target = self.acceptor.service.prepare_store(request, file_meta_header(request))
            self.pending = _PendingStore(context_id, message_id, request, target)
        else:
            raise ProtocolError(f"DIMSE command 0x{field:04X} is not supported on this node")

    def _respond(
        self,
        context_id: int,
        request_field: int,
        message_id: int,
        affected: tuple[str, str | None],
        status: Status,
    ) -> None:
        """Send the response; `affected` is the request's (SOP class, SOP instance or None)."""
        command = _encode_response(request_field, message_id, affected, status)
        # A P-DATA-TF holds at most the peer's maximum PDU length: PDV header + value.
        room = self.peer_maximum_pdu - _PDV_HEADER.size if self.peer_maximum_pdu else len(command)
        room = max(room, 1)
        fragments = [command[start : start + room] for start in range(0, len(command), room)]
        for index, fragment in enumerate(fragments):
            control = 0x03 if index == len(fragments) - 1 else 0x01
            pdv = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
            self.connection.sendall(_PDU_HEADER.pack(_P_DATA, len(pdv)) + pdv)

    # --- the socket -------------------------------------------------------------

    def _read_pdu_header(self, deadline: float | None = None) -> tuple[int, int]:
        pdu_type, length = _PDU_HEADER.unpack(self._read_exact(_PDU_HEADER.size, deadline))
        return int(pdu_type), int(length)

    def _read_exact(self, length: int, deadline: float | None = None) -> bytes:
        """`length` bytes, by `deadline` (monotonic) if given. Memory grows with what
        arrives, one piece at a time: a long announced length costs nothing until sent."""
        data = bytearray(min(length, _READ_PIECE_BYTES))
        received = 0
        while received < length:
            if received == len(data):
                data.extend(bytes(min(length - received, _READ_PIECE_BYTES)))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("ARTIM expired")
                self.connection.settimeout(left)
            count = self.connection.recv_into(memoryview(data)[received:])
            if not count:
                raise PeerClosedError("connection closed inside a PDU")
            received += count
        return bytes(data)

    def _abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):  # the peer is gone already
            self.connection.sendall(bytes([_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, reason]))


def _unexpected(pdu_type: int) -> int:
    """The A-ABORT reason for a PDU that has no place here (PS3.8 Table 9-26)."""
    return _UNEXPECTED_PDU if pdu_type in _KNOWN_PDU_TYPES else _UNRECOGNIZED_PDU


def _decode_request(pdu: bytes) -> A_ASSOCIATE:
    """Decode an A-ASSOCIATE-RQ, refusing one whose items do not fill it exactly.

    Items and sub-items of types this node does not know are skipped, as PS3.8
    9.3.1 asks ("items of unrecognized types shall be ignored and skipped"; for
    user information sub-items also Annex D.2), before pynetdicom, which would
    refuse them, decodes the rest.
    """
    # Fixed fields are 68 bytes after the PDU header; items follow (PS3.8 9.3.2).
    fixed = 6 + 68
    items = b"".join(_known_items(pdu[fixed:], _REQUEST_ITEMS))
    decoded = A_ASSOCIATE_RQ()
    try:
        decoded.decode(
            _PDU_HEADER.pack(_ASSOCIATE_RQ, fixed - 6 + len(items)) + pdu[6:fixed] + items
        )
        request = decoded.to_primitive()
    except Exception as error:  # pynetdicom asserts, or raises various errors
        raise ProtocolError(
            f"undecodable A-ASSOCIATE-RQ ({type(error).__name__})", _INVALID_PARAMETER
        ) from error
    _check_contexts(request.presentation_context_definition_list)
    return request


class _Item(NamedTuple):
    """An item type that holds sub-items: the bytes before them, and their known types."""

    head: int
    sub_items: Mapping[int, _Item | None]


# Item types of an A-ASSOCIATE-RQ (PS3.8 9.3.2, Annex D; PS3.7 Annex D.3.3); None: an
# item without sub-items.
_REQUEST_ITEMS: Mapping[int, _Item | None] = {
    0x10: None,  # application context
    0x20: _Item(4, {0x30: None, 0x40: None}),  # presentation context: abstract, transfer
    # user information: maximum length, implementation class UID, asynchronous operations
    # window, role selection, implementation version name, SOP class extended and common
    # extended negotiation, user identity
    0x50: _Item(0, dict.fromkeys(range(0x51, 0x59))),
}


def _known_items(data: bytes, known: Mapping[int, _Item | None]) -> list[bytes]:
    """The items in `data` whose types are in `known`, each with only its known
    sub-items (lengths rewritten); `ProtocolError` if the items do not fill `data`."""
    kept = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError("A-ASSOCIATE-RQ item header cut short", _INVALID_PARAMETER)
        item_type = data[offset]
        end = offset + 4 + int.from_bytes(data[offset + 2 : offset + 4], "big")
        if end > len(data):
            raise ProtocolError("malformed A-ASSOCIATE-RQ", _INVALID_PARAMETER)
        if item_type in known:
            value = data[offset + 4 : end]
            layout = known[item_type]
            if layout is not None:
                value = value[: layout.head] + b"".join(
                    _known_items(value[layout.head :], layout.sub_items)
                )
            kept.append(struct.pack(">BBH", item_type, 0, len(value)) + value)
        else:
            log.debug(
                "unrecognized A-ASSOCIATE-RQ item skipped", extra={"reason": f"0x{item_type:02X}"}
            )
        offset = end
    return kept


def _check_contexts(contexts: Sequence[PresentationContext]) -> None:
    """One or more presentation contexts, each with its own ID, an abstract syntax and
    one or more transfer syntaxes (PS3.8 9.3.2.2); else the request is aborted."""
    identifiers = [context.context_id for context in contexts]
    if not contexts or len(set(identifiers)) != len(identifiers):
        raise ProtocolError(
            "presentation context IDs missing or repeated in the A-ASSOCIATE-RQ",
            _INVALID_PARAMETER,
        )
    if any(not context.abstract_syntax or not context.transfer_syntax for context in contexts):
        raise ProtocolError(
            "a presentation context without its abstract or transfer syntax", _INVALID_PARAMETER
        )


# --- DIMSE command sets: Implicit VR Little Endian, group 0000 (PS3.7 6.3.1) -----


def _decode_command(data: bytes) -> dict[int, bytes]:
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("command set ends inside an element header", _INVALID_PARAMETER)
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise ProtocolError("malformed command set", _INVALID_PARAMETER)
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def _unsigned(command: dict[int, bytes], element: int) -> int:
    value = command.get(element)
    if value is None or len(value) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) missing or not US")
    return int.from_bytes(value, "little")


def _text(command: dict[int, bytes], element: int) -> str:
    value = command.get(element)
    if value is None:
        raise ProtocolError(f"command element (0000,{element:04X}) missing")
    return value.decode("ascii", "replace").rstrip("\0 ")


def _encode_response(
    request_field: int, message_id: int, affected: tuple[str, str | None], status: Status
) -> bytes:
    sop_class, sop_instance = affected
    elements = [
        _element(0x0002, _padded(sop_class, b"\0")),
        _element(0x0100, (request_field | _RESPONSE).to_bytes(2, "little")),
        _element(0x0120, message_id.to_bytes(2, "little")),
        _element(0x0800, _NO_DATA_SET.to_bytes(2, "little")),
        _element(0x0900, status.code.to_bytes(2, "little")),
    ]
    if status.comment:
        # LO: 64 characters of the default repertoire, no backslash.
        comment = status.comment.replace("\\", "/")[:64]
        elements.append(_element(0x0902, _padded(comment, b" ")))
    if sop_instance is not None:
        elements.append(_element(0x1000, _padded(sop_instance, b"\0")))
    body = b"".join(elements)
    return _element(0x0000, len(body).to_bytes(4, "little")) + body


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    data = text.encode("ascii", "replace")
    return data + pad if len(data) % 2 else data


# --- File Meta Information: Explicit VR Little Endian, group 0002 (PS3.10 7.1) --


def file_meta_header(request: StoreRequest) -> bytes:
    """Preamble, DICM prefix and File Meta Information for a received data set."""
    elements = (
        _explicit(0x0001, b"OB", b"\x00\x01")
        + _explicit(0x0002, b"UI", _padded(request.sop_class_uid, b"\0"))
        + _explicit(0x0003, b"UI", _padded(request.sop_instance_uid, b"\0"))
        + _explicit(0x0010, b"UI", _padded(request.transfer_syntax_uid, b"\0"))
        + _explicit(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0"))
        + _explicit(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" "))
    )
    group_length = _explicit(0x0000, b"UL", len(elements).to_bytes(4, "little"))
    return b"\0" * 128 + b"DICM" + group_length + elements


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _close(connection: socket.socket) -> None:
    """Close after the peer has read what was sent: unread input would make the
    kernel answer with a reset, which can destroy an A-ABORT still in transit."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _CLOSE_WAIT_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            if not connection.recv(65536):
                break
    connection.close()


def _peer(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _why(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return "network timeout"
    return str(error) or type(error).__name__
