"""What a Dockerfile build is given beside the file, and how Dockerfiles are named:
apart from recipe/dockerfile.py so that a build whose Dockerfile was translated
before (engine/build.py keeps the notebook) loads neither the translator nor its
Go parser."""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field


def is_dockerfile(path: str) -> bool:
    """True for the names Docker and Podman build by default: `Dockerfile`,
    `Containerfile`, `Dockerfile.*`, `*.Dockerfile` (and the same for Containerfile)."""
    name = posixpath.basename(path.replace("\\", "/")).lower()  # docker build reads `dockerfile` too
    if name.endswith((".ipynb", ".yaml", ".yml")):  # Dockerfile.ipynb is what Open as notebook writes
        return False
    return any(name == base or name.startswith(base + ".") or name.endswith("." + base)
               for base in ("dockerfile", "containerfile"))


@dataclass
class DockerfileOptions:
    """What `docker build` takes beside the Dockerfile: `--build-arg NAME=VALUE` and,
    ours, `--base IMAGE=SOURCE` (see recipe.dockerfile.translate)."""
    build_args: dict[str, str] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    all_stages: bool = False


def layer_name_for(path: str) -> str:
    """The name of a Dockerfile's last stage when it has no `AS`: `app` for
    `app.Dockerfile` or `Dockerfile.app`, else `image`."""
    name = posixpath.basename(path)
    for base in ("Dockerfile", "Containerfile", "dockerfile", "containerfile"):
        name = name.removeprefix(base + ".").removesuffix("." + base)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("._-")
    return "image" if name.lower() in ("", "dockerfile", "containerfile") else name
