"""Orthanc as the hospital PACS: started with a generated configuration, driven over REST."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers import free_port, tool
from tests.polling import wait_for
from tests.processes import ServerProcess


class Orthanc(ServerProcess):
    def __init__(self, folder: Path, ae_title: str = "ORTHANC") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities: dict[str, list[Any]] = {}
        super().__init__()

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        self.modalities[name] = [ae_title, "127.0.0.1", port]

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        configuration = {
            "Name": "pacs-node-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "HttpServerEnabled": True,
        }
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(configuration, indent=2))
        self._process = subprocess.Popen(
            [tool("Orthanc"), str(config_path)],
            stdout=(self.folder / "orthanc.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._answers, 60, "Orthanc's REST API")
        return self

    def _answers(self) -> bool:
        try:
            self.get("/system")
        except OSError:
            return False
        return True

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}{path}", timeout=30
        ) as reply:
            return json.loads(reply.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}{path}", timeout=30
        ) as reply:
            return bytes(reply.read())

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            headers={"Content-Type": content_type},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=300) as reply:
            return json.loads(reply.read())
