"""The database goes away: C-STORE answers 0xA700 (never Success), and the node recovers."""

from __future__ import annotations

from pathlib import Path

import pydicom

from pacs_node.report import read_report
from pacs_node.store import JobStore
from tests.dicom_data import renamed_series
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.postgres_server import running_cluster
from tests.processes import NodeProcess, StoreSCP
from tests.scu import store_status


def test_postgres_down_refuses_with_0xa700_and_the_node_recovers_by_itself(
    tmp_path: Path, tiny_model: Path
) -> None:
    first, during, after = (
        [pydicom.dcmread(path) for path in renamed_series(chest_ct(), tmp_path / name, count=2)]
        for name in ("first", "during", "after")
    )
    # Durable: what the node acknowledged before the crash must still be there after it.
    with (
        running_cluster(durable=True) as (cluster, server),
        StoreSCP(tmp_path / "destination") as destination,
    ):
        url = server.create_database()
        store = JobStore(url)
        store.upgrade()
        store.close()
        node = NodeProcess(
            tmp_path / "node",
            tiny_model,
            destinations=[("DEST", destination.port)],
            settings={"PACS_NODE_DATABASE__URL": url},
        )
        with node:
            assert [store_status(node.port, dataset) for dataset in first] == [0, 0]

            cluster.stop()
            statuses = [store_status(node.port, dataset) for dataset in during]
            assert statuses == [0xA700, 0xA700]
            assert node.has_logged("job store unavailable")

            cluster.start_on(server.port)
            # The sender retries, as a PACS does; the node needs no restart.
            wait_for(lambda: store_status(node.port, during[0]) == 0, 60, "C-STORE to succeed")
            assert store_status(node.port, during[1]) == 0
            assert [store_status(node.port, dataset) for dataset in after] == [0, 0]

            # All three series are classified and reported.
            def reported() -> set[str]:
                return {
                    read_report(pydicom.dcmread(path)).source_series_uid
                    for path in destination.received()
                }

            expected = {str(series[0].SeriesInstanceUID) for series in (first, during, after)}
            try:
                wait_for(lambda: reported() == expected, 180, "an SR for each of the three series")
            except AssertionError:
                print(node.log)  # what the node did, for the failure report
                raise
