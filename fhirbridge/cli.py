"""The `fhirbridge` command: serve, worker, dicomize, jobs (see README)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger("fhirbridge.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fhirbridge")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="HTTP API, MLLP listener and the pipeline workers "
                             "(pipeline.worker_processes child processes, or threads)")
    p_serve.add_argument("--config")
    p_worker = sub.add_parser("worker", help="pipeline workers only (shared PostgreSQL)")
    p_worker.add_argument("--config")
    p_worker.add_argument("--parent-pid", type=int, default=0,
                          help=argparse.SUPPRESS)  # started by `serve`: exit when it is gone
    p_dz = sub.add_parser("dicomize", help="build one DICOM object offline from a file")
    p_dz.add_argument("input")
    p_dz.add_argument("-o", "--output", required=True)
    p_dz.add_argument("--patient-id", default="")
    p_dz.add_argument("--issuer", default="")
    p_dz.add_argument("--patient-name", default="", help="Family^Given")
    p_dz.add_argument("--birth-date", default="", help="YYYYMMDD")
    p_dz.add_argument("--sex", default="", choices=["M", "F", "O", "U", ""])
    p_dz.add_argument("--body-site", default="", help="SNOMED CT code")
    p_dz.add_argument("--laterality", default="", choices=["L", "R", "B", "U", ""])
    p_dz.add_argument("--content-type", default="")
    p_jobs = sub.add_parser("jobs", help="list failed jobs, or retry one")
    p_jobs.add_argument("--config")
    p_jobs.add_argument("--retry", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_no_server_tracebacks)
    # Request URLs carry identifiers (Patient?identifier=…): keep client libraries quiet (no PHI)
    for noisy in ("httpx", "httpcore", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.command == "dicomize":
        from fhirbridge.dicomize import dicomize

        return dicomize(args)

    from fhirbridge._malloc import tune_malloc
    from fhirbridge.app import Workers, build_services, create_app
    from fhirbridge.config import load_settings

    tune_malloc()  # before the service allocates its buffers (serve, worker, jobs)
    if args.command in ("serve", "worker"):
        # PHI at rest: every file and directory the service (SQLite, pydicom, blobs, the
        # folder PACS) creates is its own user's only: 0600 / 0700
        os.umask(0o077)

    try:
        settings = load_settings(args.config)
    except Exception as exc:  # pydantic errors name the key; they carry no PHI
        print(f"fhirbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    from fhirbridge.adapters.pacs import PacsConfigError
    from fhirbridge.adapters.smart_backend import EhrAuthConfigError
    from fhirbridge.tls import TlsConfigError

    try:
        services = build_services(settings)
    except (EhrAuthConfigError, PacsConfigError, TlsConfigError) as exc:  # names the key only
        print(f"fhirbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        import uvicorn

        from fhirbridge.api.limits import h11_with_header_timeout
        from fhirbridge.config import protections_summary

        log.info("%s", protections_summary(settings))
        # HTTPS only when both [http] tls_* files are set (uvicorn loads them; checked here
        # first so a wrong file stops start-up with a message, as [mllp] tls_* do)
        from fhirbridge.tls import optional_server_context

        try:
            https = optional_server_context(settings.http.tls_cert_file,
                                            settings.http.tls_key_file,
                                            setting="http") is not None
            m = settings.mllp
            optional_server_context(m.tls_cert_file, m.tls_key_file,
                                    client_ca_file=m.tls_client_ca_file, setting="mllp")
        except TlsConfigError as exc:
            print(f"fhirbridge: configuration error: {exc}", file=sys.stderr)
            services.close()
            return 2
        # The pipeline runs in `worker_processes` child processes (outside the GIL of the
        # process that answers HTTP and MLLP), or as threads here when that is 0.
        children = WorkerProcesses(
            args.config, settings.pipeline.worker_processes if settings.pipeline.workers else 0)
        app = create_app(services, workers=0 if children.count else None)
        # h11, not httptools: with a lying Content-Length, httptools drops the valid first
        # request and answers text/plain; h11 answers it (an OperationOutcome) in order.
        # Our h11 also closes a connection whose headers are not complete in time
        # (slowloris); idle keep-alive connections close after 5 s; uvicorn's own 503 cap is
        # a backstop above ours (api.limits.ConcurrencyLimit answers an OperationOutcome).
        # log_config=None: uvicorn logs through our root handler, whose filter drops
        # tracebacks (an exception's text may quote request values).
        http = settings.http
        log.info("HTTP listening on %s:%d, TLS %s", http.host, http.port,
                 "on (HTTPS only)" if https else "off")
        tls_files = ({"ssl_certfile": http.tls_cert_file, "ssl_keyfile": http.tls_key_file}
                     if https else {})
        try:
            uvicorn.run(_answered(app), host=http.host, port=http.port, log_level="info",
                        access_log=False, log_config=None,
                        http=h11_with_header_timeout(http.request_timeout_seconds),
                        timeout_keep_alive=5,
                        limit_concurrency=2 * http.max_concurrent_requests + 16, **tls_files)
        finally:  # also when the port cannot be bound (uvicorn exits)
            children.stop()
            services.close()
        return 0
    if args.command == "worker":
        pool = Workers(services, settings.pipeline.workers)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        signal.signal(signal.SIGINT, lambda *_: done.set())
        pool.start()
        if args.parent_pid:
            while not done.wait(1.0):
                if os.getppid() != args.parent_pid:  # `serve` died without stopping us
                    break
        else:
            done.wait()
        pool.stop()
        services.close()
        return 0
    if args.command == "jobs":
        if args.retry is not None:
            ok = services.queue.retry(args.retry)
            print("queued" if ok else "no failed job with that id")
            return 0 if ok else 1
        for j in services.queue.list_failed():
            print(f"{j.id}\t{j.kind}\t{j.subject_id}\tattempts={j.attempts}\t{j.last_error}")
        return 0
    return 2


def _no_server_tracebacks(record: logging.LogRecord) -> bool:
    """uvicorn/starlette records keep their message and the exception's class name, never
    its traceback or text (they may quote request values: PHI, tokens)."""
    if record.exc_info and record.name.split(".", 1)[0] in ("uvicorn", "starlette", "fastapi"):
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__ if exc else 'error'})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def _answered(app: Any) -> Any:
    """The ASGI app, with an exception that has already been answered (Starlette's error
    middleware sends our OperationOutcome, then re-raises for the server to log) stopped
    here: api.responses has logged it once, without PHI."""

    from fhirbridge.api.limits import TrackedSend

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        tracked = TrackedSend(send)
        try:
            await app(scope, receive, tracked)
        except Exception:
            if scope.get("type") != "http" or not tracked.started:
                raise

    return asgi


class WorkerProcesses:
    """`pipeline.worker_processes` `fhirbridge worker` processes beside `serve`: the
    pipeline's Python work (parsing, pydicom, pynetdicom) then runs outside the HTTP/MLLP
    process's GIL. They share the database (SQLite WAL or PostgreSQL) and the data dir, exit
    when `serve` does, and one that dies is started again (a job it held is claimed again
    when its lease expires; every step is idempotent)."""

    MAX_DELAY = 60.0  # seconds between restarts of a worker that keeps dying at once

    def __init__(self, config: str | None, count: int, *, check_seconds: float = 1.0) -> None:
        self.argv = [sys.executable, "-m", "fhirbridge.cli", "worker",
                     "--parent-pid", str(os.getpid())]
        if config:
            self.argv += ["--config", config]
        self.count = max(0, count)
        self.children = [self._start() for _ in range(self.count)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if self.children:
            threading.Thread(target=self._supervise, args=(check_seconds,), daemon=True,
                             name="fhirbridge-worker-supervisor").start()

    def _start(self) -> tuple[subprocess.Popen[bytes], float]:
        return subprocess.Popen(self.argv), time.monotonic()

    def _supervise(self, every: float) -> None:
        """Start a dead worker again: at once if it had run a while, otherwise after a delay
        that doubles (up to MAX_DELAY) while it keeps dying young (say, the database is
        down)."""
        delays = [0.0] * self.count
        due = [0.0] * self.count
        while not self._stop.wait(every):
            with self._lock:
                for i, (child, started) in enumerate(self.children):
                    code = child.poll()
                    if code is None or self._stop.is_set():
                        continue
                    now = time.monotonic()
                    if not due[i]:
                        young = now - started < 10.0
                        delays[i] = min(self.MAX_DELAY, delays[i] * 2 or 1.0) if young else 0.0
                        due[i] = now + delays[i]
                        log.warning("worker process %s exited with %s; starting another in "
                                    "%.0f s", child.pid, code, delays[i])
                    if now >= due[i]:
                        self.children[i], due[i] = self._start(), 0.0

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for child, _ in self.children:
                if child.poll() is None:
                    child.terminate()
            for child, _ in self.children:
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


if __name__ == "__main__":
    sys.exit(main())
