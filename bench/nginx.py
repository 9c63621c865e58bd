"""nginx on 127.0.0.1 serving a bench world's static files, from a config in a temp folder.

With ``delay`` every response waits that long first (the echo module's ``echo_sleep``, from
Debian's libnginx-mod-http-echo), which makes a slow link without a slow server. The access
log records, per request, when it started on the server's clock (``$msec - $request_time``)
and its URI, so request rates are measured where the requests arrive, not by the client.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

HOST: Final = "127.0.0.1"
ECHO_MODULE: Final = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")

_CONFIG: Final = """\
{load_module}
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '$msec $request_time $status $body_bytes_sent $request_uri';
    access_log {access_log};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    types {{ image/png png; image/jpeg jpg; }}
    server {{
        listen {host}:{port} backlog=4096;
        root {www};
        location / {{
            {delay}
            default_type application/json;
        }}
        location /files/ {{
            {delay}
            default_type application/octet-stream;
        }}
        location @static {{
            default_type application/json;
        }}
    }}
}}
"""


@dataclass(frozen=True, slots=True)
class Server:
    port: int
    access_log: Path | None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def require_nginx(*, echo: bool = False) -> str:
    """The nginx binary, or exit with the command that installs it."""
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not path or (echo and not ECHO_MODULE.exists()):
        raise SystemExit(
            "bench: needs nginx with the echo module from Debian's packages: "
            "apt-get install -y nginx-light libnginx-mod-http-echo (make bench does this as root)"
        )
    return path


@contextmanager
def serving(
    www: Path,
    port: int,
    *,
    delay: float = 0.0,
    access_log: Path | None = None,
    workers: int = 2,
) -> Iterator[Server]:
    """Run nginx on 127.0.0.1:``port`` over ``www`` until the block ends."""
    binary = require_nginx(echo=delay > 0)
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        log = f"{access_log} bench" if access_log else "off"
        sleep = f"echo_sleep {delay:.3f}; echo_exec @static;" if delay > 0 else ""
        config = _CONFIG.format(
            load_module=f"load_module {ECHO_MODULE};" if delay > 0 else "",
            workers=workers,
            tmp=tmp,
            access_log=log,
            host=HOST,
            port=port,
            www=www.resolve(),
            delay=sleep,
        )
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(config)
        # -e: the error log before the config is read (the default path may be unwritable).
        args = [binary, "-c", str(conf), "-p", tmp, "-e", f"{tmp}/error.log"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    log_text = (Path(tmp) / "error.log").read_text(errors="replace")
                    raise SystemExit(f"bench: nginx did not start:\n{err}{log_text}")
                try:
                    socket.create_connection((HOST, port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: nginx did not listen within 10 s") from None
                    time.sleep(0.05)
            yield Server(port, access_log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
