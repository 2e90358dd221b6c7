"""pynetdicom as the sending peer, where a test needs the exact status of each C-STORE."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association


def associate(port: int, *datasets: Dataset, calling_ae: str = "PYNETDICOM") -> Association:
    """An established association to the node, able to store `datasets`."""
    ae = AE(ae_title=calling_ae)
    for dataset in datasets:
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert association.is_established, "the node refused the association"
    return association


def store_statuses(port: int, *datasets: Dataset, calling_ae: str = "PYNETDICOM") -> list[int]:
    """C-STORE `datasets` over one association; the status of each."""
    association = associate(port, *datasets, calling_ae=calling_ae)
    try:
        return [int(association.send_c_store(dataset).Status) for dataset in datasets]
    finally:
        association.release()


def store_status(port: int, dataset: Dataset) -> int:
    (status,) = store_statuses(port, dataset)
    return status
