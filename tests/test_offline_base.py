"""A Dockerfile's `FROM debian:bookworm` that cannot be pulled names the registry host
(Docker Hub's, not the image) and says how to build offline (--base IMAGE=SOURCE) (issue 26)."""
import subprocess
import sys

import pytest

from stacker_kernel.oci.bases import registry_host, skopeo_failure


@pytest.mark.parametrize("url, host", [
    ("docker://debian:bookworm", "docker.io (registry-1.docker.io)"),
    ("docker://library/debian", "docker.io (registry-1.docker.io)"),
    ("docker://ghcr.io/project-zot/golang:1.17", "ghcr.io"),
    ("docker://localhost:5000/team/app:v1", "localhost:5000"),
    ("docker://localhost/app", "localhost"),
])
def test_the_registry_host_of_a_reference_is_dockers(url, host):
    assert registry_host(url) == host


def test_a_failed_dns_lookup_names_docker_hub_not_the_image():
    stderr = ('time="x" level=fatal msg="initializing source docker://debian:bookworm: pinging container '
              'registry registry-1.docker.io: Get \\"https://registry-1.docker.io/v2/\\": dial tcp: lookup '
              'registry-1.docker.io: no such host"')
    line = skopeo_failure("docker://debian:bookworm", stderr, 1)
    assert "the DNS lookup of docker.io (registry-1.docker.io) failed" in line


def test_an_offline_dockerfile_build_says_to_give_the_base_with_base(storage, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm\nRUN echo hi\n")
    # No network at all (a network namespace of its own), as on a machine offline.
    proc = subprocess.run(["unshare", "--user", "--map-current-user", "--net", sys.executable, "-m",
                           "stacker_kernel", "--storage", str(storage), "build", "-f", str(tmp_path / "Dockerfile"),
                           "--no-oci"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("stacker-kernel: cannot pull docker://debian:bookworm: docker.io (registry-1.docker.io)")
    assert err[0].endswith("--base debian:bookworm=oci:DIR:TAG (or --base debian:bookworm=tar:ROOTFS.tar)")
