"""Dockerfiles in: the translation (recipe/dockerfile.py), `import` and `build -f Dockerfile`,
and real builds compared with `buildah bud --isolation chroot` from the same base.

What the comparison leaves out, on purpose (the differences a user may see):
- timestamps (mtimes, `created`, history) and layer boundaries: only the unpacked
  rootfs and the image config are compared;
- the label `io.buildah.version`, which buildah adds;
- the order of `Env` entries (compared as a mapping);
- HEALTHCHECK: an annotation of ours only; buildah drops it from OCI images;
- WORKDIR in a stage without RUN (e.g. FROM scratch) sets the working directory
  but does not create it (buildah does): such a stage has no shell to run mkdir;
  a later stage's RUN makes it; VOLUME likewise;
- in a stage without RUN, the directories a `COPY --chown` creates above its
  destination belong to root (stacker's import rule); buildah gives them the
  --chown owner (in a stage with RUN, ours do too);
- /etc/hostname, /etc/hosts, /etc/resolv.conf: buildah leaves them as empty files
  (the mount points of its RUN steps) when the base has none; ours leaves nothing.
The Dockerfiles below avoid WORKDIR and --chown into new directories in stages
without RUN; everything else must be equal: every
path, its type, mode, owner, group and content (or link target), and Env, Cmd,
Entrypoint, User, WorkingDir, Labels, ExposedPorts, Volumes, StopSignal.
"""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import nbformat
import pytest
import yaml

from kernel_support import kernels, nbdir, start_kernel  # noqa: F401 (fixtures)
from stacker_kernel.cli import main
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.errors import RecipeError
from stacker_kernel.oci.layout import OCILayout
from stacker_kernel.recipe.cells import parse_cell
from stacker_kernel.recipe.dockerfile import (
    DockerfileOptions, dockerfile_recipe, expand, is_dockerfile, layer_name_for, translate,
)
from stacker_kernel.recipe.stacker_yaml import dump, load
from stacker_kernel.storage.store import Store
from conftest import host_view


def df(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def code_cells(text: str, **options) -> list[str]:
    return [src for kind, src in translate(df(text), "app", **options).cells if kind == "code"]


def recipe(text: str, **options):
    return dockerfile_recipe(df(text), "app", **options)[0]


# --- the translation ------------------------------------------------------------------

def test_dockerfile_names_are_recognised():
    for name in ("Dockerfile", "dir/Dockerfile", "Containerfile", "app.Dockerfile",
                 "Dockerfile.dev", "Containerfile.ci", "dockerfile", "dir/dockerfile"):
        assert is_dockerfile(name), name
    for name in ("stacker.yaml", "build.ipynb", "Dockerfiles", "notes.txt"):
        assert not is_dockerfile(name), name
    assert layer_name_for("x/Dockerfile") == "image" == layer_name_for("dockerfile")
    assert layer_name_for("app.Dockerfile") == "app" == layer_name_for("Dockerfile.app")


def test_only_the_stages_the_target_needs_are_layers_and_only_the_target_is_an_image():
    text = """
        FROM busybox AS build
        RUN echo built > /out
        FROM build AS test
        RUN test -e /out
        FROM busybox AS docs
        RUN echo docs > /docs
        FROM scratch
        COPY --from=build /out /out
        """
    assert list(recipe(text).layers) == ["build", "app"]  # as BuildKit: test and docs are not built
    r = recipe(text, target="TEST")
    assert list(r.layers) == ["build", "test"] and [l.build_only for l in r.layers.values()] == [True, False]
    r = recipe(text, all_stages=True)
    assert list(r.layers) == ["build", "test", "docs", "app"]
    assert not any(layer.build_only for layer in r.layers.values())
    with pytest.raises(RecipeError, match=r"^--target nope names no stage of the Dockerfile \(its stages: "
                                          r"build, test, docs, 3\)"):
        recipe(text, target="nope")
    r = recipe(text.replace("COPY --from=build", "COPY --from=test"))
    assert r.layers["build"].from_.type == "docker" and r.layers["build"].from_.url == "docker://busybox"
    assert r.layers["test"].from_.type == "built" and r.layers["test"].from_.tag == "build"
    assert r.layers["app"].from_.type == "scratch"
    assert [layer.build_only for layer in r.layers.values()] == [True, True, False]
    assert r.dependency_order() == ["build", "test", "app"]


def test_copy_from_a_stage_is_a_stacker_import_of_the_built_layer():
    r = recipe("""
        FROM busybox AS build
        WORKDIR /src
        RUN echo x > out.bin
        FROM scratch
        COPY --from=build --chown=1000:2000 --chmod=0750 out.bin /app/
        COPY --from=0 /etc/passwd /etc/passwd
        """)
    imports = r.layers["app"].imports
    assert [(i.path, i.dest, i.mode, i.uid, i.gid) for i in imports] == [
        ("stacker://build/src/out.bin/", "/app/", 0o750, 1000, 2000),
        ("stacker://build/etc/passwd/", "/etc/passwd", None, None, None)]


def test_copy_destinations_resolve_against_the_workdir_and_keep_directory_intent():
    dests = {}
    for dest in ("/", ".", "./", "x", "x/", "/a/b", "..", "sub/."):
        layer = recipe(f"FROM scratch\nWORKDIR /w\nCOPY a {dest}\n").layers["app"]
        dests[dest] = layer.imports[0].dest
    assert dests == {"/": "/", ".": "/w/", "./": "/w/", "x": "/w/x", "x/": "/w/x/",
                     "/a/b": "/a/b", "..": "/", "sub/.": "/w/sub/"}


def test_wildcard_sources_are_the_context_files_they_match():
    files = {"package.json", "package-lock.json", "src/a.js"}

    def match(pattern):
        import fnmatch
        return [f for f in files if fnmatch.fnmatch(f, pattern) and f.count("/") == pattern.count("/")]

    layer = recipe("FROM scratch\nCOPY package*.json /app/\n", match=match).layers["app"]
    assert [(i.path, i.dest) for i in layer.imports] == [("package-lock.json/", "/app/"),
                                                        ("package.json/", "/app/")]
    with pytest.raises(RecipeError, match=r"line 2: no file of the build context matches '\*.md'"):
        recipe("FROM scratch\nCOPY *.md /\n", match=match)
    with pytest.raises(RecipeError, match=r"line 2: COPY with several sources needs a destination"):
        recipe("FROM scratch\nCOPY package*.json /app\n", match=match)


def test_unnamed_stages_are_stage_n_and_copy_from_takes_an_index():
    r = recipe("""
        FROM busybox
        RUN touch /a
        FROM scratch
        COPY --from=0 /a /a
        """)
    assert list(r.layers) == ["stage-0", "app"]
    assert r.layers["app"].imports[0].path == "stacker://stage-0/a/"


def test_arg_before_from_is_used_in_from_and_build_args_override_it():
    text = """
        ARG BASE=busybox
        ARG TAG=1.36
        FROM ${BASE}:${TAG} AS one
        FROM $BASE
        """
    r = recipe(text, all_stages=True)
    assert r.layers["one"].from_.url == "docker://busybox:1.36"
    assert r.layers["app"].from_.url == "docker://busybox"
    r = recipe(text, build_args={"TAG": "latest", "BASE": "alpine"}, all_stages=True)
    assert r.layers["one"].from_.url == "docker://alpine:latest"


def test_a_global_arg_reaches_a_stage_only_when_declared_again():
    cells = code_cells("""
        ARG VERSION=2.0
        FROM busybox
        RUN echo "$VERSION"
        ARG VERSION
        RUN echo "$VERSION"
        """)
    assert "export VERSION=2.0" not in cells[0] and "export VERSION=2.0" in cells[2]


def test_platform_args_are_given_when_declared():
    cells = code_cells("""
        FROM busybox:${TARGETARCH}
        ARG TARGETARCH
        ARG TARGETPLATFORM
        RUN echo "$TARGETARCH"
        """, platform="linux/arm64")
    assert "%from docker docker://busybox:arm64" in cells[0]
    assert "export TARGETARCH=arm64\n" in cells[1] and "export TARGETPLATFORM=linux/arm64" in cells[1]


def test_from_platform_is_accepted_for_the_platform_built_and_refused_for_another():
    from stacker_kernel.recipe.dockerfile import host_platform

    host = host_platform()
    cells = code_cells(f"""
        FROM --platform=$BUILDPLATFORM busybox AS build
        ARG BUILDPLATFORM
        ARG TARGETOS
        ARG TARGETARCH
        RUN echo "$BUILDPLATFORM $TARGETOS/$TARGETARCH"
        FROM --platform=${{TARGETPLATFORM}} busybox
        FROM --platform={host} busybox
        """, all_stages=True)
    assert f"export BUILDPLATFORM={host}" in cells[1]
    assert f"export TARGETOS={host.split('/')[0]}" in cells[1]
    assert f"export TARGETARCH={host.split('/')[1]}" in cells[1]
    foreign = "linux/s390x" if host != "linux/s390x" else "linux/amd64"
    with pytest.raises(RecipeError, match=rf"^line 2: FROM --platform={foreign} is not the platform "
                                          rf"built \({host}\)"):
        code_cells(f"FROM busybox\nFROM --platform={foreign} busybox\n")


def test_arg_and_env_substitutions_with_defaults():
    env = {"SET": "v", "EMPTY": ""}
    assert expand("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", env, 1) == "v d d "
    assert expand("${SET:+alt} ${UNSET:+alt} $SET/x ${SET}y", env, 1) == "alt  v/x vy"
    assert expand("'$SET' \"$SET\" \\$SET", env, 1) == "$SET v $SET"
    layer = recipe("""
        FROM busybox
        ARG VERSION=1.0
        ENV APP=/opt/app V=${VERSION} OLD=$APP
        ENV MODE="release build" PATH=/opt/app/bin:$PATH
        LABEL version=$VERSION "two words"="x y"
        """, build_args={"VERSION": "3.1"}).layers["app"]
    assert layer.environment == {"APP": "/opt/app", "V": "3.1", "OLD": "", "MODE": "release build",
                                 "PATH": "/opt/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                         "/usr/bin:/sbin:/bin"}
    assert layer.labels == {"version": "3.1", "two words": "x y"}


def test_env_and_arg_are_exported_for_the_run_steps_after_them():
    cells = code_cells("""
        FROM busybox
        ARG A=1
        ENV B=two\\ words
        RUN echo "$A $B"
        """)
    assert cells[1].splitlines() == ["# line 2: ARG A=1", "# line 3: ENV B=two\\ words",
                                     "%environment 'B=two words'", "export A=1",
                                     "export B='two words'"]


def test_line_continuations_stay_in_the_run_cell():
    cells = code_cells("""
        FROM busybox
        RUN apk add --no-cache \\
              curl \\
              git && \\
            echo done
        """)
    assert cells[-1].endswith("(set +e\napk add --no-cache \\\n      curl \\\n      git && \\\n"
                              "    echo done\n)")


def test_shell_form_runs_like_sh_c_and_exec_form_runs_the_argv():
    cells = code_cells("""
        FROM busybox
        RUN cd /tmp && false; echo "$HOME"
        RUN ["/bin/echo", "two words", "$HOME"]
        SHELL ["/bin/bash", "-o", "pipefail", "-c"]
        RUN cat /etc/os-release | head -1
        CMD echo hi
        ENTRYPOINT ["/bin/tini", "--"]
        """)
    assert cells[1].endswith("(set +e\ncd /tmp && false; echo \"$HOME\"\n)")
    assert cells[2].endswith("\n/bin/echo 'two words' '$HOME'")
    assert cells[4].endswith("\n/bin/bash -o pipefail -c 'cat /etc/os-release | head -1'")
    layer = recipe("""
        FROM busybox
        SHELL ["/bin/bash", "-c"]
        CMD echo hi
        ENTRYPOINT ["/bin/tini", "--"]
        """).layers["app"]
    assert layer.cmd == ["/bin/bash", "-c", "echo hi"]
    assert layer.entrypoint == ["/bin/tini", "--"]


def test_workdir_chains_resolve_and_each_run_starts_there():
    text = """
        FROM busybox
        WORKDIR /opt
        WORKDIR app
        WORKDIR ../lib/$NAME
        ENV NAME=x
        WORKDIR $NAME
        RUN pwd
        """
    assert recipe(text).layers["app"].working_dir == "/opt/lib/x"
    cells = code_cells(text)
    assert "cd /opt/lib/x" in cells[1] and "mkdir -p /opt/app" in cells[1]


def test_user_sets_the_runtime_user_and_the_runs_after_it_run_as_that_user():
    r = recipe("""
        FROM busybox
        RUN adduser -D app
        USER app:app
        RUN id
        COPY a /a
        RUN ["id", "-u"]
        USER root
        RUN id
        """)
    layer = r.layers["app"]
    assert layer.runtime_user == "root"
    assert [s.user for s in layer.steps] == [None, None, "app:app", None, "app:app", None]
    assert dump(r).startswith("# layer app: the steps starting '#%user USER' ran as USER here")
    # an image HOME stays HOME in a RUN as another user (as Docker)
    cells = code_cells("""
        FROM busybox
        ENV HOME=/srv
        USER 1000
        RUN echo $HOME
        """)
    assert cells[-1].endswith("%user 1000\n(set +e\nexport HOME=/srv\necho $HOME\n)")
    assert code_cells("FROM busybox\nRUN --network=default --network=host true\n")[-1].endswith(
        "(set +e\ntrue\n)")


def test_copy_in_a_stage_with_run_is_staged_and_copied_by_a_cell_in_order():
    r = recipe("""
        FROM busybox
        RUN mkdir /app
        COPY --chown=app:app conf/ /etc/app/
        RUN ls /etc/app
        """)
    layer = r.layers["app"]
    assert [(i.path, i.dest) for i in layer.imports] == [("conf/", None)]
    copy = layer.steps[2].source
    assert copy.startswith("# line 3: COPY --chown=app:app conf/ /etc/app/")
    assert "chown -R app:app /.stacker-kernel-copy" in copy and "rm -rf /.stacker-kernel-copy" in copy


def test_expose_stopsignal_volume_maintainer_and_healthcheck():
    r, warnings = dockerfile_recipe(df("""
        FROM busybox
        EXPOSE 80 53/udp
        EXPOSE ${PORT:-8080}
        VOLUME ["/data", "/logs"]
        VOLUME /cache
        STOPSIGNAL SIGQUIT
        MAINTAINER Jane <j@example.com>
        HEALTHCHECK --interval=5s CMD wget -q localhost
        """), "app")
    layer = r.layers["app"]
    assert layer.annotations["io.stacker-kernel.config.ExposedPorts"] == "80/tcp 53/udp 8080/tcp"
    assert layer.annotations["io.stacker-kernel.config.StopSignal"] == "SIGQUIT"
    assert layer.annotations["org.opencontainers.image.authors"] == "Jane <j@example.com>"
    assert layer.annotations["io.stacker-kernel.dockerfile.healthcheck"] == \
        "--interval=5s CMD wget -q localhost"
    assert layer.volumes == ["/data", "/logs", "/cache"]
    assert warnings == ["line 8: HEALTHCHECK is kept as the annotation "
                          "io.stacker-kernel.dockerfile.healthcheck only: an OCI image config has "
                          "no health check (buildah ignores it too)"]


def test_base_maps_a_from_image_to_another_source_by_name_or_normalized():
    text = """
        FROM docker.io/library/busybox:latest AS a
        FROM debian:12 AS b
        FROM alpine
        """
    r = recipe(text, bases={"busybox": "oci:/srv/oci:busybox", "debian:12": "tar:/srv/debian.tar",
                            "alpine": "docker://localhost:5000/alpine"}, all_stages=True)
    assert (r.layers["a"].from_.type, r.layers["a"].from_.url) == ("oci", "/srv/oci:busybox")
    assert (r.layers["b"].from_.type, r.layers["b"].from_.url) == ("tar", "/srv/debian.tar")
    assert r.layers["app"].from_.url == "docker://localhost:5000/alpine"


def test_the_notebook_and_yaml_made_from_a_dockerfile_are_no_dockerfiles():
    from stacker_kernel.recipe.dockerfile import is_dockerfile

    assert is_dockerfile("Dockerfile") and is_dockerfile("app.Containerfile") and is_dockerfile("Dockerfile.dev")
    assert not is_dockerfile("ctx/Dockerfile.ipynb") and not is_dockerfile("Dockerfile.yaml")


def test_from_with_buildahs_docker_transport_is_that_image():
    r = recipe("FROM docker://docker.io/library/busybox:1.36\n")
    assert r.layers["app"].from_.url == "docker://docker.io/library/busybox:1.36"


def test_a_stage_built_on_a_stage_inherits_its_environment_workdir_and_command():
    r = recipe("""
        FROM busybox AS base
        ENV A=1
        WORKDIR /w
        CMD ["sh"]
        FROM base
        RUN touch here
        """)
    first_cell = r.layers["app"].steps[0].source
    assert "export A=1" in first_cell and "cd /w" in first_cell
    assert r.layers["app"].cmd == ["sh"]


def test_the_yaml_of_a_dockerfile_loads_back_to_the_same_recipe():
    r = recipe("""
        FROM busybox AS build
        ENV A=1
        COPY x /x
        RUN echo hi
        FROM scratch
        COPY --from=build --chmod=0755 /x /bin/x
        EXPOSE 80
        CMD ["/bin/x"]
        """)
    assert load(dump(r)) == r


BAD = [
    ("FROM busybox AS a\nONBUILD FROM x\nFROM a\n", r"line 2: ONBUILD FROM is not allowed"),
    ("FROM busybox\nADD --checksum=md5:x https://example.com/a /a\n", r"line 2: ADD --checksum=md5:x is not sha256"),
    ("FROM busybox\nADD --checksum=sha256:x a /a\n", r"line 2: ADD --checksum needs a URL source"),
    ("FROM busybox\nADD git@github.com:a/b.git /b\n", r"line 2: ADD of the URL git@github.com"),
    ("FROM busybox\nADD rootfs.tar.gz /\n", r"line 2: ADD of the archive rootfs.tar.gz"),
    ("FROM busybox\n\nRUN --mount=type=cache,target=/c,from=x true\n",
     r"line 3: RUN --mount=type=cache,target=/c,from=x: a cache mount takes no from"),
    ("FROM busybox\nRUN --mount=type=bind,from=img:1,target=/c true\n",
     r"line 2: RUN --mount from=img:1 names no earlier stage"),
    ("FROM busybox\nRUN --network=none true\n", r"line 2: RUN --network=none is not supported"),
    ("FROM busybox\nRUN --security=insecure true\n", r"line 2: RUN --security is not supported"),
    ("FROM scratch\nCOPY <<EOF /a\nhi\nEOF\n", r"line 2: COPY <<\.\.\. in a stage without RUN"),
    ("FROM --platform=linux/s390x busybox\n", r"line 1: FROM --platform=linux/s390x is not the platform built"),
    ("FROM busybox\nCOPY *.txt /\n", r"line 2: the wildcard source '\*.txt' needs the build context"),
    ("FROM busybox\nCOPY --from=nginx:1 /etc/nginx /etc/nginx\n",
     r"line 2: COPY --from=nginx:1 names no earlier stage"),
    ("FROM busybox\nCOPY --parents a /a\n", r"line 2: COPY --parents is not supported"),
    ("FROM busybox\nCOPY ../secret /s\n", r"line 2: '../secret' is outside the build context"),
    ("FROM busybox\nCOPY a b /dir\n", r"line 2: COPY with several sources needs a destination ending in /"),
    ("FROM busybox\nSHELL /bin/bash -c\n", r"line 2: SHELL needs the JSON form"),
    ("RUN true\nFROM busybox\n", r"line 1: RUN comes before the first FROM"),
    ("FROM busybox AS a\nFROM busybox AS a\n", r"line 2: stage name a is used twice"),
    ("FROM busybox\nCOPY --chmod=u+x a /a\n", r"line 2: --chmod=u\+x is not an octal mode"),
    ("FROM busybox\nWORKDIR ${A/x/y}\n", r"line 2: \$\{A/x/y\} is not a substitution"),
    ("# just a comment\n", r"the Dockerfile does not parse: file with no instructions"),
    ("ARG A=1\n", r"the Dockerfile has no FROM"),
    ("FROM busybox\nFETCH a\n", r"line 2: FETCH is not a Dockerfile instruction"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[-1][:40].strip() for _, m in BAD])
def test_what_cannot_be_translated_is_one_error_naming_its_line(text, message):
    with pytest.raises(RecipeError, match=message):
        dockerfile_recipe(text, "app")


# --- the CLI: import ------------------------------------------------------------------------

def test_import_writes_a_notebook_and_a_stacker_yaml(tmp_path, capsys):
    (tmp_path / "ctx").mkdir()
    dockerfile = tmp_path / "ctx" / "Dockerfile"
    dockerfile.write_text(df("""
        ARG BASE=busybox
        FROM $BASE
        ARG MSG=hi
        COPY app.sh /app/
        RUN echo "$MSG" > /msg
        HEALTHCHECK CMD true
        """))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["import", str(dockerfile), "-o", str(out / "build.ipynb"), "--build-arg", "MSG=yo",
                 "--base", f"busybox=oci:{tmp_path}/oci:busybox"]) == 0
    assert "warning: " in capsys.readouterr().err  # the HEALTHCHECK one
    nb = nbformat.read(out / "build.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert [parse_cell(c).directives[0].name for c in code[:1]] == ["layer"]
    assert f"%from oci {tmp_path}/oci:busybox" in code[0]
    assert "%import ../ctx/app.sh/" in code[0]  # relative to the notebook: it builds from there
    assert "export MSG=yo" in code[1]
    assert main(["import", str(dockerfile), "-o", str(out / "stacker.yaml")]) == 0
    doc = yaml.safe_load((out / "stacker.yaml").read_text())
    assert doc["image"]["from"] == {"type": "docker", "url": "docker://busybox"}
    assert doc["image"]["imports"] == ["../ctx/app.sh/"]
    assert "export MSG=hi" in doc["image"]["run"]
    nb2 = tmp_path / "again.ipynb"
    main(["import", str(dockerfile), "-o", str(nb2)])
    main(["import", str(dockerfile), "-o", str(tmp_path / "again2.ipynb")])
    assert nb2.read_text() == (tmp_path / "again2.ipynb").read_text()


def test_import_of_a_bad_dockerfile_is_one_line_naming_file_and_line(tmp_path, capsys):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM busybox\nRUN --network=none make\n")
    assert main(["import", str(dockerfile), "-o", str(tmp_path / "nb.ipynb")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stacker-kernel: {dockerfile}: line 2: RUN --network=none is not supported")
    assert "\n" not in err


def test_an_imported_notebook_filters_its_imports_with_the_dockerignore(tmp_path, capsys):
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM busybox\nCOPY a /a\nFROM busybox AS b\n")
    (tmp_path / "ctx" / ".dockerignore").write_text("*.log\n")
    assert main(["import", str(tmp_path / "ctx" / "Dockerfile"), "-o", str(tmp_path / "nb.ipynb"),
                 "--all-stages"]) == 0
    code = [c.source for c in nbformat.read(tmp_path / "nb.ipynb", as_version=4).cells
            if c.cell_type == "code"]
    assert "%dockerignore ctx/.dockerignore" in code[0] and "%dockerignore" not in code[1]
    assert "warning" not in capsys.readouterr().err


# --- real builds ---------------------------------------------------------------------------

def test_a_dockerfile_notebook_steps_through_in_the_kernel_with_rollback(nbdir, kernels, storage):
    """The imported notebook runs cell by cell in the kernel; rolling back to a RUN's
    cell undoes the RUNs after it, and re-running a RUN cell replaces its result."""
    (nbdir / "Dockerfile").write_text(df("""
        FROM busybox
        ENV GREETING=hello
        WORKDIR /app
        RUN echo "$GREETING one" > one
        RUN echo two > two
        """))
    assert main(["import", str(nbdir / "Dockerfile"), "-o", str(nbdir / "df.ipynb"),
                 "--base", f"busybox=tar:{nbdir}/busybox.tar"]) == 0
    cells = [c for c in nbformat.read(nbdir / "df.ipynb", as_version=4).cells if c.cell_type == "code"]
    k = start_kernel(nbdir / "df.ipynb", kernels, STACKER_KERNEL_STORAGE=str(storage))
    try:
        for cell in cells:
            run = k.execute(cell.source, cell.id, timeout=120)
            assert run.status == "ok", run.error
        assert k.execute("ls /app; cat /app/one", "look", timeout=60).stream_text().split() == \
            ["one", "two", "hello", "one"]
        assert k.execute(f"%rollback {cells[2].id}", "back", timeout=60).status == "ok"
        assert k.execute("ls /app", "look2", timeout=60).stream_text().split() == ["one"]
        # a cell of its own as another user, with a tmpfs of its own; the next is root again
        run = k.execute("%user nobody\n%mount type=tmpfs,target=/scratch\nid -u; echo $HOME; "
                        "touch /scratch/x && echo tmpfs", "as-nobody", timeout=60)
        assert run.status == "ok" and run.stream_text().split() == ["65534", "/", "tmpfs"]
        assert k.execute("id -u; echo $HOME; ls /scratch 2>&1 | wc -l", "as-root",
                         timeout=60).stream_text().split() == ["0", "/root", "1"]
    finally:
        k.close()


def _context(tmp_path: Path, dockerfile: str) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "src" / "lib").mkdir(parents=True)
    (ctx / "conf").mkdir()
    (ctx / "Dockerfile").write_text(df(dockerfile))
    (ctx / "hello.sh").write_text("#!/bin/sh\necho hello \"$@\"\n")
    (ctx / "hello.sh").chmod(0o644)
    (ctx / "src" / "main.txt").write_text("main\n")
    (ctx / "src" / "lib" / "lib.txt").write_text("lib\n")
    (ctx / "src" / "run.sh").write_text("#!/bin/sh\n")
    (ctx / "src" / "run.sh").chmod(0o755)
    (ctx / "conf" / "app.conf").write_text("key=value\n")
    (ctx / "conf" / ".hidden").write_text("dot\n")
    (ctx / "data.txt").write_text("data\n")
    (ctx / "notes.txt").write_text("notes\n")
    os.symlink("main.txt", ctx / "src" / "link")
    if dockerfile == IGNORE:
        (ctx / ".dockerignore").write_text(DOCKERIGNORE)
    for p in [tmp_path, *ctx.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o055)
    ctx.chmod(0o755)
    return ctx


APP = """
    # a single-stage service image, as many are written
    ARG BASE=busybox
    FROM ${BASE}
    ARG VERSION=1.0
    ARG GREETING
    ENV APP_HOME=/opt/app \\
        APP_VERSION=${VERSION} \\
        MODE="release build"
    LABEL org.opencontainers.image.version=$VERSION maintainer="team@example.com"
    WORKDIR $APP_HOME
    WORKDIR lib
    WORKDIR ../bin
    COPY --chmod=0755 hello.sh ./
    COPY conf/ /etc/app/
    COPY data.txt notes.txt ../share/
    COPY n*.txt [d]ata.* /opt/app/docs/
    COPY src /opt/app/src
    RUN echo "version $APP_VERSION greeting ${GREETING:-none} home $HOME" > /opt/app/version.txt && \\
        cd / && false; \\
        echo "$MODE" > /opt/app/mode.txt
    RUN pwd > /opt/app/pwd.txt; echo "${CARRIED:-not carried}" > /opt/app/carried.txt
    RUN ["/bin/sh", "-c", "echo exec form $APP_VERSION > /opt/app/exec.txt"]
    SHELL ["/bin/sh", "-e", "-c"]
    RUN echo "$0" > /opt/app/shell.txt
    RUN echo "app:x:1000:1000::/home/app:/bin/sh" >> /etc/passwd && \
        echo "app:x:1000:" >> /etc/group && \
        mkdir -p /home/app /data && chown app:app /home/app /data
    COPY --chown=app:app conf/app.conf /home/app/
    COPY --chown=1000 data.txt /home/app/new/dirs/data
    USER app
    EXPOSE 8080
    VOLUME /data
    STOPSIGNAL SIGQUIT
    ENTRYPOINT ["/opt/app/bin/hello.sh"]
    CMD ["--help"]
    """

MULTI = """
    # build in one stage, test in another, ship the result from scratch
    ARG BUILDER=busybox
    FROM ${BUILDER} AS build
    WORKDIR /src
    COPY src/ .
    RUN mkdir -p /out/bin /out/etc && \\
        cat main.txt lib/lib.txt > /out/bin/app && chmod 0755 /out/bin/app && \\
        echo built > /out/etc/stamp && ln -s app /out/bin/app-link
    FROM build AS test
    RUN test -x /out/bin/app && echo ok > /out/test-ok
    FROM scratch
    COPY --from=build --chown=65534:65534 /out/bin/app /app
    COPY --from=test /out/test-ok /
    COPY --from=0 /out/etc/ /etc/app/
    ENV PATH=/
    USER 65534:65534
    EXPOSE 9090/udp 9091
    LABEL org.opencontainers.image.title="multi stage"
    ENTRYPOINT ["app"]
    """

INHERIT = """
    # a base stage with the environment, an image built on it
    FROM busybox AS base
    ENV BASE_VAR=one
    WORKDIR /work
    LABEL stage=base
    EXPOSE 80
    VOLUME /cache
    STOPSIGNAL SIGINT
    CMD ["sh"]
    FROM base
    RUN echo "$BASE_VAR in $(pwd)" > note.txt
    COPY --from=base /etc/passwd /etc/group ./copied/
    ENV SECOND=two
    USER nobody
    """


def test_a_dockerfile_builds_like_docker_runs_it(storage, busybox_oci, tmp_path):
    """Unprivileged: RUN steps see ENV, ARG and WORKDIR, not each other's cd or variables,
    run without errexit like `sh -c`; exec form; COPY rules; stage inheritance."""
    ctx = _context(tmp_path, APP)
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              oci_dir=str(tmp_path / "oci"),
              dockerfile=DockerfileOptions({"GREETING": "hey"}, {"busybox": "oci:" + busybox_oci}))
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    app = root / "opt/app"
    assert (app / "version.txt").read_text() == "version 1.0 greeting hey home /root\n"
    assert (app / "mode.txt").read_text() == "release build\n"
    assert (app / "pwd.txt").read_text() == "/opt/app/bin\n"
    assert (app / "carried.txt").read_text() == "not carried\n"
    assert (app / "exec.txt").read_text() == "exec form 1.0\n"
    assert stat.S_IMODE((app / "bin/hello.sh").stat().st_mode) == 0o755
    assert (root / "etc/app/.hidden").read_text() == "dot\n"
    assert (app / "share/notes.txt").is_file() and (app / "src/lib/lib.txt").is_file()
    assert os.readlink(app / "src/link") == "main.txt"
    assert not (root / ".stacker-kernel-copy").exists()
    config = OCILayout(str(tmp_path / "oci")).resolve("image").config["config"]
    assert config["ExposedPorts"] == {"8080/tcp": {}} and config["StopSignal"] == "SIGQUIT"
    assert config["User"] == "app" and config["WorkingDir"] == "/opt/app/bin"


USERS = """
    # steps as other users: by name, name:group, numbers, a uid without a passwd entry
    FROM busybox
    RUN echo "app:x:1000:1000::/home/app:/bin/sh" >> /etc/passwd && \\
        printf 'app:x:1000:\\ncrew:x:2000:app\\n' >> /etc/group && \\
        mkdir -p /data /home/app && chown app /data /home/app && chmod 0755 /data
    USER app
    ENV GREETING=hi
    RUN id > /data/id.txt; echo "$HOME $GREETING" > /data/home.txt; touch /data/by-app
    ARG UID=1000
    RUN echo "uid $UID" > /data/uid.txt; mkdir -p $HOME/.cache && touch $HOME/.cache/x
    USER 1000:crew
    RUN ["/bin/sh", "-c", "id > /data/id-group.txt; touch /data/by-group"]
    USER 4242
    RUN id > /tmp/id-4242.txt; echo "$HOME" > /tmp/home-4242.txt
    USER root
    RUN echo "$HOME" > /root-home.txt && cp /tmp/*-4242.txt /data/
    COPY data.txt /data/copied.txt
    RUN for f in /data/by-app /data/by-group /data/copied.txt /home/app/.cache/x; do \\
            ls -ln "$f" | { read -r mode links u g rest; echo "$f $u $g"; }; done > /owners.txt
    USER app
    """


def test_runs_after_user_run_as_that_user_with_its_home(storage, busybox_oci, tmp_path):
    ctx = _context(tmp_path, USERS)
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    data = root / "data"
    assert (data / "id.txt").read_text() == "uid=1000(app) gid=1000(app) groups=1000(app),2000(crew)\n"
    assert (data / "home.txt").read_text() == "/home/app hi\n"
    assert (data / "uid.txt").read_text() == "uid 1000\n"
    assert (data / "id-group.txt").read_text() == "uid=1000(app) gid=2000(crew) groups=2000(crew)\n"
    assert (data / "id-4242.txt").read_text() == "uid=4242 gid=0(root) groups=0(root)\n"
    assert (data / "home-4242.txt").read_text() == "/\n"
    assert (root / "root-home.txt").read_text() == "/root\n"
    owners = sorted(tuple(ln.split())  # as the container sees them
                    for ln in (root / "owners.txt").read_text().splitlines())
    assert owners == [("/data/by-app", "1000", "1000"), ("/data/by-group", "1000", "2000"),
                      ("/data/copied.txt", "0", "0"), ("/home/app/.cache/x", "1000", "1000")]


IGNORE = """
    # .dockerignore in a stage without RUN (imports land) and one with RUN (a cell copies)
    FROM busybox AS plain
    COPY . /ctx/
    FROM busybox
    COPY --from=plain /ctx /plain
    COPY src /src
    COPY *.txt /txt/
    RUN ls -a /src /txt > /listing
    """
DOCKERIGNORE = """
# what a project keeps out of its images
*.txt
!data.txt
src/lib
**/.hidden
Dockerfile
.dockerignore
"""


def test_dockerignore_keeps_excluded_files_out_of_copy(storage, busybox_oci, tmp_path):
    ctx = _context(tmp_path, IGNORE)
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    plain = sorted(str(p.relative_to(root / "plain")) for p in (root / "plain").rglob("*"))
    assert plain == ["conf", "conf/app.conf", "data.txt", "hello.sh", "src", "src/link",
                     "src/main.txt", "src/run.sh"]
    assert sorted(os.listdir(root / "src")) == ["link", "main.txt", "run.sh"]
    assert os.listdir(root / "txt") == ["data.txt"]
    (ctx / "notes.txt").rename(ctx / "gone")
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY data.txt notes.txt /x/\n")
    (ctx / "notes.txt").write_text("ignored\n")
    with Store.open(storage) as store, pytest.raises(RecipeError, match=r"import notes.txt/ is excluded "
                                                                       r"by .dockerignore"):
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))


HEREDOCS = """
    # heredocs, COPY --link, several sources into ., same base names, ONBUILD of a stage
    FROM busybox AS base
    ONBUILD RUN echo "triggered in $(pwd)" > /triggered
    ONBUILD ENV FROM_TRIGGER=yes
    FROM base
    ARG WHO=world
    WORKDIR /w
    RUN <<EOF
    echo "hello $WHO" > /w/run.txt
    cd /
    echo "second line" >> /w/run.txt
    EOF
    RUN <<EOT
    #!/bin/sh
    echo "shebang $0" | sed 's/ .*tmp.*/ script/' > /w/shebang.txt
    EOT
    RUN cat <<EOF > /w/cat.txt && pwd >> /w/cat.txt
    from cat $WHO
    EOF
    COPY <<EOF /w/conf.txt
    name=$WHO 'quoted'
    EOF
    COPY --chmod=0600 <<'EOF' <<two.txt /w/docs/
    raw $WHO
    EOF
    two
    two.txt
    COPY --link data.txt notes.txt .
    COPY src/main.txt src/lib/ conf/ ./merged/
    RUN echo "$FROM_TRIGGER" > /w/trigger-env.txt
    """


def test_heredocs_link_same_names_and_onbuild_of_a_stage(storage, busybox_oci, tmp_path):
    ctx = _context(tmp_path, HEREDOCS)
    (ctx / "conf" / "main.txt").write_text("conf main\n")
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              oci_dir=str(tmp_path / "oci"),
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    w = root / "w"
    assert (w / "run.txt").read_text() == "hello world\nsecond line\n"
    assert (w / "shebang.txt").read_text() == "shebang script\n"
    assert (w / "cat.txt").read_text() == "from cat world\n/w\n"
    assert (w / "conf.txt").read_text() == "name=world 'quoted'\n"
    assert (w / "docs" / "EOF").read_text() == "raw $WHO\n" and (w / "docs" / "two.txt").read_text() == "two\n"
    assert stat.S_IMODE((w / "docs" / "two.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((w / "conf.txt").stat().st_mode) == 0o644
    assert (w / "data.txt").read_text() == "data\n" and (w / "notes.txt").read_text() == "notes\n"
    assert sorted(os.listdir(w / "merged")) == [".hidden", "app.conf", "lib.txt", "main.txt"]
    assert (w / "merged" / "main.txt").read_text() == "conf main\n"  # the last source wins, as Docker
    assert (root / "triggered").read_text() == "triggered in /\n"
    assert (w / "trigger-env.txt").read_text() == "yes\n"
    layout = OCILayout(str(tmp_path / "oci"))
    assert layout.resolve("image").config["config"].get("OnBuild") is None  # the image has none of its own
    assert main(["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"), "--target", "base",
                 "--base", "busybox=oci:" + busybox_oci, "--oci-dir", str(tmp_path / "oci")]) == 0
    assert OCILayout(str(tmp_path / "oci")).resolve("base").config["config"]["OnBuild"] == [
        'RUN echo "triggered in $(pwd)" > /triggered', "ENV FROM_TRIGGER=yes"]
    # an image FROM that image (a local OCI base) runs its triggers first, as Docker does
    (ctx / "Dockerfile").write_text("FROM mybase\nRUN echo \"$FROM_TRIGGER\" > /env\n")
    assert main(["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"), "--no-oci",
                 "--base", f"mybase=oci:{tmp_path / 'oci'}:base"]) == 0
    with Store.open(storage) as store:
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    assert (root / "triggered").read_text() == "triggered in /\n" and (root / "env").read_text() == "yes\n"


CHOWN = """
    # --chown by name in stages without RUN (a distroless-like final stage)
    FROM busybox AS users
    RUN echo "app:x:1000:1000::/home/app:/bin/sh" >> /etc/passwd && \\
        printf 'app:x:1000:\\ncrew:x:2000:app\\n' >> /etc/group
    FROM users
    COPY --chown=app:crew conf/ /etc/
    COPY --chown=app data.txt /data.txt
    COPY --chown=1000:crew notes.txt /notes.txt
    USER app
    """


def test_chown_names_in_a_stage_without_run_are_the_images_users(storage, busybox_oci, tmp_path):
    ctx = _context(tmp_path, CHOWN)
    assert "%import conf/ --dest /etc/ --uid app --gid crew" in code_cells(CHOWN)[2]
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
        base = (root / "etc").stat()  # owned by the image's root
        ids = {p: ((root / p).lstat().st_uid - base.st_uid, (root / p).lstat().st_gid - base.st_gid)
               for p in ("etc/app.conf", "data.txt", "notes.txt")}
    sub = ids["data.txt"][0] - 1000  # subordinate ids start after the user's own (0) one
    assert ids == {"etc/app.conf": (1000 + sub, 2000 + sub), "data.txt": (1000 + sub, 1000 + sub),
                   "notes.txt": (1000 + sub, 2000 + sub)}
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY --chown=nobody2 data.txt /d\n")
    with Store.open(storage) as store, pytest.raises(
            Exception, match=r"there is no user nobody2 in the image's /etc/passwd"):
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))


MOUNTS = """
    # RUN --mount: cache kept between builds, secret, bind (context, stage, rw), tmpfs
    FROM busybox AS tools
    RUN mkdir -p /opt/tools && echo "tool v1" > /opt/tools/version
    FROM busybox
    ARG RUNID=1
    WORKDIR /w
    RUN --mount=type=cache,target=cache,id=appcache \\
        echo "run $RUNID" >> cache/log && cp cache/log /w/cache-log
    RUN --mount=type=secret,id=token wc -c < /run/secrets/token > /w/token-size && \\
        ls -l /run/secrets/token | cut -c1-10 > /w/token-mode
    RUN --mount=type=secret,id=absent,required=false test ! -e /run/secrets/absent && echo ok > /w/absent
    RUN --mount=type=bind,source=conf,target=/src cat /src/app.conf > /w/bound && \\
        if touch /src/x 2>/dev/null; then echo writable; else echo read-only; fi > /w/bind-ro
    RUN --mount=type=bind,from=tools,source=/opt/tools,target=/tools cp /tools/version /w/tool-version
    RUN --mount=type=bind,source=conf,target=/src,rw touch /src/written && ls /src > /w/rw-listing
    RUN --mount=type=tmpfs,target=/scratch echo x > /scratch/y && grep -c " /scratch " /proc/mounts > /w/tmpfs
    """


def test_run_mounts_cache_secret_bind_and_tmpfs(storage, busybox_oci, tmp_path, monkeypatch):
    ctx = _context(tmp_path, MOUNTS)
    token = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("SK_TEST_TOKEN", token)
    args = ["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"), "--base",
            "busybox=oci:" + busybox_oci, "--secret", "id=token,env=SK_TEST_TOKEN"]
    assert main(args + ["--oci-dir", str(tmp_path / "oci")]) == 0
    with Store.open(storage) as store:
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    w = root / "w"
    assert (w / "cache-log").read_text() == "run 1\n"
    assert not (w / "cache").exists() and not (root / "run" / "secrets").exists()
    assert (w / "token-size").read_text().strip() == str(len(token))
    assert (w / "token-mode").read_text() == "-r--------\n" and (w / "absent").read_text() == "ok\n"
    assert (w / "bound").read_text() == "key=value\n" and (w / "bind-ro").read_text() == "read-only\n"
    assert (w / "tool-version").read_text() == "tool v1\n"
    assert "written" in (w / "rw-listing").read_text().split() and not (ctx / "conf" / "written").exists()
    assert (w / "tmpfs").read_text() == "1\n" and not (root / "scratch").exists()
    # the secret is in no file of the storage (layers, cache records, logs) nor of the image layout
    for top in (storage, tmp_path / "oci"):
        for dirpath, _, files in os.walk(top):
            for name in files:
                p = os.path.join(dirpath, name)
                if os.path.isfile(p) and not os.path.islink(p) and os.access(p, os.R_OK):
                    assert token.encode() not in Path(p).read_bytes(), p
    # the cache mount is kept between builds; a changed bind source runs its step again
    (ctx / "conf" / "app.conf").write_text("key=changed\n")
    assert main(args + ["--build-arg", "RUNID=2", "--no-oci"]) == 0
    with Store.open(storage) as store:
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    assert (root / "w" / "cache-log").read_text() == "run 1\nrun 2\n"
    assert (root / "w" / "bound").read_text() == "key=changed\n"
    monkeypatch.delenv("SK_TEST_TOKEN")
    (ctx / "Dockerfile").write_text("FROM busybox\nRUN --mount=type=secret,id=k,required true\n")
    assert main(args[:-2] + ["--no-oci"]) == 1


STAGE_OWNERS = """
    FROM busybox AS tools
    RUN mkdir -p /opt/tools/sub && echo v1 > /opt/tools/version && echo s > /opt/tools/sub/s && \\
        chown -R 1000:1001 /opt/tools && chmod 600 /opt/tools/version && chmod 750 /opt/tools/sub
    FROM busybox
    RUN --mount=type=bind,from=tools,source=/opt/tools,target=/tools \\
        stat -c '%n %u:%g %a' /tools /tools/version /tools/sub /tools/sub/s > /ro && cat /tools/version >> /ro
    RUN --mount=type=bind,from=tools,source=/opt/tools,target=/tools,rw \\
        stat -c '%n %u:%g %a' /tools /tools/version /tools/sub /tools/sub/s > /rw && \\
        echo w > /tools/sub/new && rm /tools/version && ls /tools > /rw-after
    RUN --mount=type=bind,from=tools,source=/opt/tools,target=/tools ls /tools > /ro-after
    """


def test_a_bind_from_a_stage_keeps_its_owners_and_modes_also_rw(storage, busybox_oci, tmp_path):
    """BuildKit shows a stage's files as they are in the stage, copied (rw) or not; the
    overlay driver binds a copy of them, which must keep owners as btrfs's bind does."""
    ctx = _context(tmp_path, STAGE_OWNERS)
    assert main(["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"), "--base",
                 "busybox=oci:" + busybox_oci, "--no-oci"]) == 0
    with Store.open(storage) as store:
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    owners = ("/tools 1000:1001 755\n/tools/version 1000:1001 600\n"
              "/tools/sub 1000:1001 750\n/tools/sub/s 1000:1001 644\n")
    assert (root / "ro").read_text() == owners + "v1\n"
    assert (root / "rw").read_text() == owners
    assert (root / "rw-after").read_text().split() == ["sub"]
    assert (root / "ro-after").read_text().split() == ["sub", "version"]  # rw writes are discarded
    assert not (storage / "tmp").exists() or not any((storage / "tmp").iterdir())


@pytest.fixture
def http_files(tmp_path):
    """A local http.server over tmp_path/www (Last-Modified from the files' mtimes)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_add_of_a_url_is_fetched_with_its_checksum_and_the_servers_mtime(storage, busybox_oci, tmp_path,
                                                                          http_files):
    www, url = http_files
    (www / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.utime(www / "tool.sh", (1_600_000_000, 1_600_000_000))
    digest = hashlib.sha256((www / "tool.sh").read_bytes()).hexdigest()
    ctx = _context(tmp_path, f"""
        FROM busybox AS plain
        ADD {url}/tool.sh /dl/
        FROM busybox
        ADD --checksum=sha256:{digest} {url}/tool.sh /opt/tool
        ADD --chmod=0755 {url}/tool.sh /bin/
        COPY --from=plain /dl /from-plain
        RUN stat -c '%a %Y' /opt/tool /bin/tool.sh /from-plain/tool.sh > /stats
        """)
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    assert (root / "opt" / "tool").read_text() == "#!/bin/sh\necho tool\n"
    assert (root / "stats").read_text() == "600 1600000000\n755 1600000000\n600 1600000000\n"
    (ctx / "Dockerfile").write_text(f"FROM busybox\nADD --checksum=sha256:{'0' * 64} {url}/tool.sh /t\n")
    with Store.open(storage) as store, pytest.raises(RecipeError, match=r"has sha256 " + digest):
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))


WILDCARDS = """
    # wildcards in COPY --from: one match as a file, several into a directory
    FROM busybox AS build
    RUN mkdir -p /out/lib/sub /out/docs && echo jar > /out/app-1.2.jar && \\
        echo a > /out/a.bin && echo b > /out/b.bin && echo l > /out/lib/sub/l.so && \\
        echo d > /out/docs/readme.md
    FROM busybox AS runner
    COPY --from=build /out/app-*.jar /opt/app.jar
    COPY --from=build /out/*.bin /out/li[b] /opt/bin/
    RUN ls -R /opt > /opt/listing
    FROM scratch
    COPY --from=build /out/app-?.?.jar /app.jar
    COPY --from=build /out/*.bin /bin/
    COPY --from=runner /opt/listin* /
    """


def test_wildcards_in_copy_from_match_in_the_stage(storage, busybox_oci, tmp_path):
    ctx = _context(tmp_path, WILDCARDS)
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None,
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        root = host_view(layer_snapshot(store, str(ctx / "Dockerfile"), "image").path)
    assert (root / "app.jar").read_text() == "jar\n"
    assert sorted(os.listdir(root / "bin")) == ["a.bin", "b.bin"]
    assert (root / "listing").read_text().split() == [
        "/opt:", "app.jar", "bin", "listing", "/opt/bin:", "a.bin", "b.bin", "sub", "/opt/bin/sub:", "l.so"]


STAGES = """
    FROM busybox AS builder
    RUN head -c 3000000 /dev/urandom > /big && echo small > /small
    FROM busybox AS broken
    RUN echo "never built" && exit 3
    FROM builder AS test
    RUN echo tested > /tested
    FROM busybox
    COPY --from=builder /small /small
    """


def test_only_the_target_stages_are_built_and_only_the_target_is_in_the_layout(storage, busybox_oci, tmp_path):
    ctx = _context(tmp_path, STAGES)
    base = ["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"),
            "--base", "busybox=oci:" + busybox_oci]
    assert main(base + ["--oci-dir", str(tmp_path / "oci")]) == 0  # the broken stage is not built
    layout = OCILayout(str(tmp_path / "oci"))
    assert sorted(layout.tags()) == ["image"]
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    assert sum(p.stat().st_size for p in blobs.iterdir()) < 3_000_000  # not the builder's /big
    assert main(base + ["--target", "test", "--oci-dir", str(tmp_path / "oci2")]) == 0
    assert sorted(OCILayout(str(tmp_path / "oci2")).tags()) == ["test"]
    assert main(base + ["--all-stages", "--oci-dir", str(tmp_path / "oci3")]) == 1  # broken is built


def test_a_run_as_a_user_the_image_lacks_fails_naming_it(storage, busybox_oci, tmp_path, capsys):
    ctx = _context(tmp_path, "FROM busybox\nUSER ghost\nRUN true\n")
    assert main(["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"), "--no-oci",
                 "--base", "busybox=oci:" + busybox_oci]) == 1
    out = capsys.readouterr()
    assert "USER ghost: there is no user ghost in the image's /etc/passwd" in out.out + out.err


def test_a_dockerfile_imported_as_stacker_yaml_builds_the_same_rootfs(storage, busybox_oci, tmp_path):
    ctx = _context(tmp_path, MULTI)
    assert main(["import", str(ctx / "Dockerfile"), "-o", str(tmp_path / "stacker.yaml"),
                 "--base", "busybox=oci:" + busybox_oci]) == 0
    with Store.open(storage) as store:
        for f in (ctx / "Dockerfile", tmp_path / "stacker.yaml"):
            build(store, str(f), out=lambda s: None, stream=lambda s: None,
                  dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        trees = [_tree(host_view(layer_snapshot(store, str(f), "image").path))
                 for f in (ctx / "Dockerfile", tmp_path / "stacker.yaml")]
    assert trees[0] == trees[1]
    assert trees[0]["/app"][1] != trees[0]["/etc/app/stamp"][1]  # --chown


EMPTY = hashlib.sha256(b"").hexdigest()


def _tree(root: Path) -> dict[str, tuple]:
    """path -> (mode, uid, gid, sha256 of the content or the link target) for every entry."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            else:
                what = ""
            out["/" + os.path.relpath(p, root)] = (oct(st.st_mode), st.st_uid, st.st_gid, what)
    return out


def tree_differences(got_tree: dict, want_tree: dict) -> dict:
    """Path -> (ours, buildah's) where the unpacked trees differ, leaving out the empty
    mount points buildah's RUN leaves behind (/etc/hostname, /etc/hosts, /etc/resolv.conf)."""
    for mount_point in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
        if mount_point not in got_tree and want_tree.get(mount_point, ("",) * 4)[3] == EMPTY:
            want_tree.pop(mount_point, None)
    return {p: (got_tree.get(p), want_tree.get(p)) for p in set(got_tree) | set(want_tree)
            if got_tree.get(p) != want_tree.get(p)}


def _unpack(layout: str, tag: str, dest: Path) -> tuple[dict, dict]:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)], check=True,
                   capture_output=True)
    config = OCILayout(layout).resolve(tag).config["config"]
    config.get("Labels", {}).pop("io.buildah.version", None)
    config = {k: v for k, v in config.items() if v not in (None, {}, [])}
    config["Env"] = dict(e.split("=", 1) for e in config.get("Env", []))
    return _tree(dest / "rootfs"), config


@pytest.fixture
def buildah(tmp_path, busybox_oci):
    """`buildah` with its own storage, holding the busybox base as docker.io/library/busybox."""
    root = tmp_path / "buildah"
    cmd = ["buildah", "--root", str(root / "root"), "--runroot", str(root / "run"),
           "--storage-driver", "vfs"]
    # buildah makes /run/containers (its network state); gone again, it cannot
    # stand between an unprivileged skopeo and /run/containers/UID/auth.json
    made_run = not os.path.exists("/run/containers")
    subprocess.run(cmd + ["pull", "-q", "oci:" + busybox_oci], check=True, capture_output=True)
    image = subprocess.run(cmd + ["images", "-q"], check=True, capture_output=True,
                           text=True).stdout.split()[0]
    subprocess.run(cmd + ["tag", image, "docker.io/library/busybox:latest"], check=True)
    yield cmd
    subprocess.run(cmd + ["rmi", "-a", "-f"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
    if made_run:
        shutil.rmtree("/run/containers", ignore_errors=True)


@pytest.mark.rootful
@pytest.mark.parametrize("dockerfile", [APP, MULTI, INHERIT, USERS, IGNORE, CHOWN, WILDCARDS],
                         ids=["app", "multi-stage", "inherit", "users", "dockerignore", "chown", "wildcards"])
def test_the_image_equals_what_buildah_builds_from_the_same_dockerfile(
        dockerfile, storage, busybox_oci, buildah, tmp_path):
    ctx = _context(tmp_path, dockerfile)
    args = ["--build-arg", "GREETING=hey"]
    subprocess.run(buildah + ["bud", "--isolation", "chroot", "--pull-never", "-q", *args,
                              "-f", str(ctx / "Dockerfile"), "-t", "want", str(ctx)],
                   check=True, capture_output=True)
    subprocess.run(buildah + ["push", "-q", "want", f"oci:{tmp_path}/want:want"], check=True,
                   capture_output=True)
    assert main(["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"), *args,
                 "--base", "busybox=oci:" + busybox_oci, "--oci-dir", str(tmp_path / "got")]) == 0
    want_tree, want_config = _unpack(f"{tmp_path}/want", "want", tmp_path / "want-bundle")
    got_tree, got_config = _unpack(str(tmp_path / "got"), "image", tmp_path / "got-bundle")
    differ = tree_differences(got_tree, want_tree)
    assert differ == {}
    assert json.dumps(got_config, sort_keys=True, indent=1) == json.dumps(want_config, sort_keys=True, indent=1)
