"""Debian's nginx serving a folder inside a test namespace (ranges, a no-ranges path, redirects, 503s, WebDAV PUT),
and the fault-injecting proxy (tests/fault_proxy.py) started in a namespace."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from net_helpers import ROOT, Host

NGINX_PORT = 8080

NGINX_CONF = """
user root;
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  log_format ranges '$request_method $uri $status "$http_range" $body_bytes_sent';
  access_log {tmp}/access.log ranges;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  default_type application/octet-stream;
  sendfile on;
  server {{
    listen {addr}:{port};
    root {root};
    location /noranges/ {{ alias {root}/; max_ranges 0; }}
    location /redirect/ {{ rewrite ^/redirect/(.*)$ /$1 redirect; }}
    location /busy/ {{ return 503; }}
    location /upload/ {{
      dav_methods PUT;
      create_full_put_path on;
      client_max_body_size 0;
    }}
  }}
}}
"""


class Nginx:
    def __init__(self, host: Host, root: Path, tmp: Path, port: int = NGINX_PORT) -> None:
        self.host, self.root, self.tmp, self.port = host, root, tmp, port
        self.url = f"http://{host.addr}:{port}"

    def access_log(self) -> list[str]:
        path = self.tmp / "access.log"
        return path.read_text().splitlines() if path.exists() else []


def wait_for_port(host: Host, addr: str, port: int, timeout: float = 10) -> None:
    probe = (
        "import socket,sys,time\nend=time.time()+%r\nwhile True:\n try:\n  socket.create_connection((%r,%d),1).close();break\n"
        " except OSError:\n  time.sleep(0.05)\n  if time.time()>end: sys.exit(1)\n" % (timeout, addr, port)
    )
    subprocess.run(host.cmd(sys.executable, "-c", probe), check=True, timeout=timeout + 5)


@contextlib.contextmanager
def nginx(host: Host, root: Path, tmp: Path, port: int = NGINX_PORT):
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise RuntimeError("nginx is not installed (tests/run installs it)")
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, root=root, addr=host.addr, port=port))
    proc = subprocess.Popen(host.cmd("nginx", "-c", conf, "-p", tmp, "-g", "daemon off;"), stderr=subprocess.PIPE)
    try:
        wait_for_port(host, host.addr, port)
        yield Nginx(host, root, tmp, port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def fault_proxy(host: Host, listen_port: int, upstream: str, *flags):
    """tests/fault_proxy.py in `host`'s namespace on host.addr:listen_port; yields a function returning its log."""
    proc = subprocess.Popen(
        host.cmd(sys.executable, ROOT / "tests" / "fault_proxy.py", f"{host.addr}:{listen_port}", upstream, *map(str, flags)),
        stdout=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout.readline().strip() == "ready"

        def log(wait: float = 0.5) -> list[str]:
            time.sleep(wait)  # the proxy prints a connection's line when both of its directions have ended
            proc.terminate()
            lines.extend(proc.stdout.read().splitlines())
            return lines

        yield log
    finally:
        proc.kill()
        proc.wait()
