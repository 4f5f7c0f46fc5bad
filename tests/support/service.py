"""Run fhirbridge itself as users do — `fhirbridge serve --config FILE` — for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.phi import watch_log_file

ROOT = Path(__file__).resolve().parents[2]
FHIRBRIDGE = Path(sys.executable).parent / "fhirbridge"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class FhirbridgeService:
    """A `fhirbridge serve` process on free loopback ports with its own data dir."""

    def __init__(self, workdir: Path, *, pacs_url: str = "", ehr_url: str = "",
                 wado_rs_url: str = "", database_url: str = "", workers: int = 2,
                 pacs_options: dict[str, Any] | None = None,
                 extra: str = "", env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.mllp_port = free_port()
        self.data_dir = workdir / "var"
        lines = [f"data_dir = {toml_value(self.data_dir)}"]
        if database_url:
            lines.append(f"database_url = {toml_value(database_url)}")
        lines += ["", "[http]", 'host = "127.0.0.1"', f"port = {self.http_port}",
                  "", "[mllp]", 'host = "127.0.0.1"', f"port = {self.mllp_port}",
                  "", "[pacs]", f"url = {toml_value(pacs_url)}" if pacs_url else "",
                  f"wado_rs_url = {toml_value(wado_rs_url)}",
                  *[f"{k} = {toml_value(v)}" for k, v in (pacs_options or {}).items()],
                  "", "[ehr]", f"fhir_url = {toml_value(ehr_url)}",
                  "", "[pipeline]", f"workers = {workers}", "backoff_base_seconds = 0.2",
                  "poll_seconds = 0.05", ""]
        self.config = workdir / "fhirbridge.toml"
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.log = workdir / "fhirbridge.log"
        watch_log_file(self.log)  # scanned for PHI and tokens at the end of the session
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.fhir = f"{self.base}/fhir"
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.base, timeout=30)

    def start(self) -> FhirbridgeService:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(FHIRBRIDGE), "serve", "--config", str(self.config)], cwd=self.workdir,
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fhirbridge exited: {self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("fhirbridge did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()

    def worker_pids(self) -> list[int]:
        """The `fhirbridge worker` processes `serve` has started (pipeline.worker_processes)."""
        assert self.proc is not None
        kids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            kids += [int(c) for c in (task / "children").read_text().split()]
        return [k for k in kids if b"worker" in _cmdline(k)]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def post_media(self, media: dict[str, Any]) -> httpx.Response:
        return self.client.post("/fhir/Media", json=media,
                                headers={"Content-Type": "application/fhir+json"})

    def task_for(self, focus: str) -> dict[str, Any]:
        bundle = self.client.get("/fhir/Task", params={"focus": focus}).json()
        return bundle["entry"][0]["resource"]

    def wait_task(self, focus: str, *, until: tuple[str, ...] = ("completed", "failed", "on-hold"),
                  timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        task: dict[str, Any] = {}
        while time.monotonic() < deadline:
            task = self.task_for(focus)
            if task["status"] in until:
                return task
            time.sleep(0.05)
        raise AssertionError(f"task for {focus} stuck in {task.get('status')}: "
                             f"{self.log_text()[-2000:]}")


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # exited meanwhile
        return []
