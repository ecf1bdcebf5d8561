"""Local network peers for tests: a free port, and Debian's docker-registry on it."""
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_registry(tmp_path: Path, auth: str = ""):
    """Run a docker-registry on 127.0.0.1 with its storage in `tmp_path` (and the
    `auth:` yaml block `auth`, if any); yields HOST:PORT, stops it afterwards."""
    port = free_port()
    conf = tmp_path / "registry.yml"
    conf.write_text(f"""version: 0.1
log: {{level: error}}
storage:
  filesystem: {{rootdirectory: {tmp_path / 'data'}}}
http:
  addr: 127.0.0.1:{port}
{auth}""")
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):  # wait until it listens (or died)
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()
