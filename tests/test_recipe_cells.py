"""The magic syntax and script splitting of recipe/cells.py (pure)."""
import pytest

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.cells import (
    MAGICS, BrowseArgs, ExportArgs, GrabArgs, apply_cell, apply_directive, complete_magic,
    format_directives, format_generate_labels, join_steps, parse_cell, parse_magic,
    split_script,
)
from stacker_kernel.recipe.model import Bind, ImageSource, Import, Layer


def one(line: str):
    return parse_magic(line, 1).args


# --- cell structure -----------------------------------------------------------


def test_magics_at_top_then_script():
    cell = parse_cell("%layer build\n%from scratch\napk add gcc\nmake")
    assert [d.name for d in cell.directives] == ["layer", "from"]
    assert cell.script == "apk add gcc\nmake"


def test_blank_and_comment_lines_allowed_among_magics():
    cell = parse_cell("%layer a\n\n# base image\n%from scratch\n\necho hi")
    assert [d.line for d in cell.directives] == [1, 4]
    assert cell.script == "echo hi"


def test_comment_after_last_magic_belongs_to_script():
    assert parse_cell("%from scratch\n# install\napk add x").script == "# install\napk add x"


def test_cell_without_magics_is_all_script():
    text = "# just a comment\n\necho hi\n"
    assert parse_cell(text) == parse_cell(text) and parse_cell(text).script == text


def test_shebang_line_starts_the_script():
    with pytest.raises(RecipeError, match="after the script started"):
        parse_cell("#!/bin/bash\n%layer x")


def test_magic_after_script_is_an_error_naming_the_line():
    with pytest.raises(RecipeError, match=r"magic %cmd on line 3 comes after the script "
                                          r"started: move it to the top"):
        parse_cell("%from scratch\necho hi\n%cmd foo")


def test_percent_lines_inside_a_heredoc_are_script():
    text = "cat > app.spec <<'EOF'\n%define x 1\n%build\nEOF\nrpmbuild app.spec"
    assert parse_cell(text).script == text


def test_layer_must_be_the_first_magic_of_its_cell():
    with pytest.raises(RecipeError, match="%layer on line 2 is not the cell's first magic"):
        parse_cell("%from scratch\n%layer x")


def test_interactive_magics_are_not_recipe_directives():
    cell = parse_cell("%network none\n%from scratch\nls")
    assert [d.name for d in cell.recipe_directives()] == ["from"]
    assert cell.directives[0].interactive


# --- errors ---------------------------------------------------------------------


def test_unknown_magic_suggests_the_closest():
    with pytest.raises(RecipeError) as e:
        parse_cell("%lyer base")
    assert str(e.value) == "unknown magic %lyer on line 1: did you mean %layer? (%help lists them)"


def test_unknown_magic_without_close_match_points_to_help():
    with pytest.raises(RecipeError, match=r"unknown magic %zzzz on line 2: \(%help lists them\)"):
        parse_cell("\n%zzzz")


def test_lone_percent_is_an_unknown_magic():
    with pytest.raises(RecipeError, match="unknown magic % on line 1"):
        parse_cell("%")


@pytest.mark.parametrize("line, problem", [
    ("%layer", "expected 1 argument"),
    ("%layer a b", "expected 1 argument"),
    ("%layer a:b", "forbidden"),
    ("%from", "expected a base type"),
    ("%from dockr docker://x", "did you mean docker"),
    ("%from oci ./oci", "has no tag"),
    ("%from scratch extra", "expected 0 arguments"),
    ("%from built", "expected 1 argument"),
    ("%from docker docker://x --insecur", "did you mean --insecure"),
    ("%import", "expected at least 1"),
    ("%import a --dest", "--dest needs a value"),
    ("%import a --dest rel", "cannot be relative"),
    ("%import a --mode 9z", "mode '9z' is not a number"),
    ("%import a --uid -1", "uid must be >= 0"),
    ("%import a b --dest /x", "expected 1 argument"),
    ("%import a --hash 12", "not a sha256"),
    ("%import a --legacy=1", "--legacy takes no value"),
    ("%environment A", "'A' is not KEY=VALUE"),
    ("%labels =x", "'=x' is not KEY=VALUE"),
    ("%build_env", "expected at least 1"),
    ("%binds a => b", "expected SOURCE or SOURCE -> DEST"),
    ("%cmd", "expected at least 1"),
    ("%cmd [1, 2]", "list of strings"),
    ("%entrypoint [\"a\"", "invalid JSON"),
    ("%full_command echo 'x", "cannot split the arguments"),
    ("%working_dir", "expected 1 argument"),
    ("%volumes", "expected at least 1"),
    ("%build_only yes", "expected 0 arguments"),
    ("%generate_labels x", "expected 0 arguments"),
    ("%os", "expected 1 argument"),
    ("%rollback 1 2", "expected 0 to 1"),
    ("%diff x", "N 'x' is not a number"),
    ("%grab", "expected 1 to 2"),
    ("%browse a b c", "expected 0 to 2"),
    ("%export tarball", "unknown export format 'tarball'"),
    ("%keep_failed maybe", "expected on or off"),
    ("%cache", "expected 1 argument"),
    ("%network bridge", "expected none or host"),
    ("%help nothing", "there is no magic %nothing"),
    ("%layers now", "expected 0 arguments"),
])
def test_bad_arguments_name_magic_line_and_usage(line, problem):
    name = line.split()[0]
    with pytest.raises(RecipeError) as e:
        parse_cell("# first\n" + line)
    msg = str(e.value)
    assert msg.startswith(f"{name} on line 2: ") and problem in msg
    assert msg.endswith(MAGICS[name[1:]].usage)


# --- typed arguments ------------------------------------------------------------


@pytest.mark.parametrize("line, source", [
    ("%from scratch", ImageSource("scratch")),
    ("%from tar ./rootfs.tar", ImageSource("tar", url="./rootfs.tar")),
    ("%from tar https://x/r.tar.gz", ImageSource("tar", url="https://x/r.tar.gz")),
    ("%from oci ./oci:busybox", ImageSource("oci", url="./oci:busybox")),
    ("%from oci ${{BUSYBOX_OCI}}", ImageSource("oci", url="${{BUSYBOX_OCI}}")),
    ("%from built parent", ImageSource("built", tag="parent")),
    ("%from docker docker://alpine:3.19", ImageSource("docker", url="docker://alpine:3.19")),
    ("%from docker --insecure docker://reg:5000/x", ImageSource("docker", url="docker://reg:5000/x",
                                                                insecure=True)),
])
def test_from_parses_every_base_type(line, source):
    assert one(line) == source


def test_import_options():
    assert one("%import conf/ --dest /etc/app/ --mode 0640 --uid=1000 --gid 0 --hash "
               + "A" * 64) == [Import("conf/", hash="A" * 64, dest="/etc/app/", mode=0o640,
                                      uid=1000, gid=0)]


def test_import_several_plain_paths():
    assert one("%import a b 'c d'") == [Import("a"), Import("b"), Import("c d")]


def test_import_legacy_flag():
    assert one("%import x --legacy") == [Import("x", legacy=True)]


def test_key_value_magics_split_like_a_shell():
    assert one('%environment PATH=/bin:/usr/bin MSG="hello world" EMPTY=') == {
        "PATH": "/bin:/usr/bin", "MSG": "hello world", "EMPTY": ""}


def test_binds_arrow_form():
    assert one("%binds /srv/cache -> /cache") == Bind("/srv/cache", "/cache")
    assert one("%binds /srv/cache") == Bind("/srv/cache", "/srv/cache")


def test_commands_shell_or_json():
    assert one("%cmd /bin/sh -c 'echo hi'") == ["/bin/sh", "-c", "echo hi"]
    assert one('%entrypoint ["/init", "a b"]') == ["/init", "a b"]
    assert one("%full_command []") == []


def test_interactive_arguments():
    assert one("%rollback") is None
    assert one("%rollback 3") == 3
    assert one("%rollback 5f2c-id") == "5f2c-id"
    assert one("%diff 2") == 2
    assert one("%grab /out/app.deb ./dist") == GrabArgs("/out/app.deb", "./dist")
    assert one("%browse") == BrowseArgs()
    assert one("%browse /etc") == BrowseArgs(None, "/etc")
    assert one("%browse build /usr") == BrowseArgs("build", "/usr")
    assert one("%browse 4") == BrowseArgs(4, None)
    assert one("%export") == ExportArgs("stacker.yaml", [])
    assert one("%export oci --tag v1") == ExportArgs("oci", ["--tag", "v1"])
    assert one("%export out.yaml --per-cell") == ExportArgs("stacker.yaml", ["out.yaml",
                                                                              "--per-cell"])
    assert one("%keep_failed on") is True
    assert one("%cache off") is False
    assert one("%network none") == "none"
    assert one("%help %rollback") == "rollback"


def test_every_magic_has_usage_and_help():
    for name, spec in MAGICS.items():
        assert spec.usage.startswith("%" + name) and spec.help


# --- completion -------------------------------------------------------------------


def test_complete_magic_names():
    assert complete_magic("%lay") == ["%layer", "%layers"]


def test_complete_from_types():
    assert complete_magic("%from d") == ["docker"]


def test_complete_on_off():
    assert complete_magic("%cache o") == ["on", "off"]


def test_complete_help_topics():
    assert complete_magic("%help ro") == ["%rollback"]


def test_complete_outside_magics_is_empty():
    assert complete_magic("echo %la") == []


# --- applying and formatting --------------------------------------------------------


def test_apply_directive_returns_a_new_layer():
    base = Layer("a", ImageSource("scratch"))
    new = apply_directive(base, parse_magic("%environment A=1", 1))
    assert new.environment == {"A": "1"} and base.environment == {}


def test_apply_accumulates_lists_and_maps():
    layer = Layer("a", ImageSource("scratch"))
    cell = parse_cell("%volumes /a\n%volumes /b /c\n%labels x=1\n%labels y=2\n%cmd a\n%cmd b")
    layer = apply_cell(layer, cell)
    assert layer.volumes == ["/a", "/b", "/c"]
    assert layer.labels == {"x": "1", "y": "2"}
    assert layer.cmd == ["b"]


def test_apply_generate_labels_takes_the_cell_script():
    layer = apply_cell(Layer("a", ImageSource("scratch")),
                       parse_cell("%generate_labels\necho v > /stacker/oci-labels/v\n"))
    assert layer.generate_labels == "echo v > /stacker/oci-labels/v"


def test_apply_rejects_mixing_legacy_and_new_imports():
    layer = apply_cell(Layer("a", ImageSource("scratch")), parse_cell("%import x"))
    with pytest.raises(RecipeError, match="cannot be used together"):
        apply_cell(layer, parse_cell("%import y --legacy"))


def test_apply_refuses_interactive_magics():
    with pytest.raises(ValueError):
        apply_directive(Layer("a", ImageSource("scratch")), parse_magic("%layers", 1))


def _full_layer() -> Layer:
    return Layer(
        "app", ImageSource("docker", url="docker://reg/x:1", insecure=True),
        imports=[Import("a b"), Import("conf/", hash="f" * 64, dest="/etc/", mode=0o600,
                                       uid=0, gid=5)],
        build_env={"CC": "gcc -O2"}, build_env_passthrough=[],
        environment={"A": "1 2", "Q": "it's"}, labels={"l": ""},
        cmd=["sh", "-c", "echo 'x'"], entrypoint=[], full_command=["/init"],
        working_dir="/w", volumes=["/d 1"], runtime_user="1000",
        annotations={"k": "v=w"}, os="linux", arch="amd64", build_only=True,
        binds=[Bind("/s", "/s"), Bind("/h", "/c")],
        overlay_dirs=[{"source": "o"}, {"source": "p", "dest": "/usr"}],
        generate_labels="echo 1 > /stacker/oci-labels/a")


def test_format_directives_parses_back_to_the_same_layer():
    layer = _full_layer()
    cell = parse_cell(format_directives(layer) + "\n" + format_generate_labels(layer))
    assert cell.directives[0].args == "app"
    rebuilt = apply_cell(Layer("app", ImageSource("scratch")), cell)
    assert rebuilt == layer


def test_format_directives_starts_with_layer_and_from():
    text = format_directives(Layer("x", ImageSource("built", tag="base")))
    assert text == "%layer x\n%from built base"


# --- splitting and joining scripts ----------------------------------------------------


def test_split_at_blank_lines_keeps_comments_with_commands():
    script = "apt-get update\n\n# the compiler\napt-get install gcc\n\nmake"
    assert split_script(script) == ["apt-get update", "# the compiler\napt-get install gcc",
                                    "make"]


def test_split_never_cuts_inside_compound_commands_or_heredocs():
    script = ("if true; then\n  a\n\n  b\nfi\n\ncat <<-EOF > f\n\n\tx\n\tEOF\n\n"
              "for i in 1 2\ndo\n\n  echo $i\ndone\n\necho 'q\n\nq'\n\nf() {\n\n  :\n}")
    assert split_script(script) == [
        "if true; then\n  a\n\n  b\nfi", "cat <<-EOF > f\n\n\tx\n\tEOF",
        "for i in 1 2\ndo\n\n  echo $i\ndone", "echo 'q\n\nq'", "f() {\n\n  :\n}"]


def test_split_keeps_a_shebang_script_whole():
    script = "#!/bin/bash -ex\na\n\nb"
    assert split_script(script) == [script]


def test_split_keywords_count_only_in_command_position():
    assert split_script("echo if\n\necho done") == ["echo if", "echo done"]


def test_split_at_cell_markers():
    assert split_script("#!/bin/bash\na\n\nb\n# %%\nc") == ["#!/bin/bash\na\n\nb", "c"]


@pytest.mark.parametrize("script", [
    "a\n\nb", "a\n\n\nb", "# only comment", "a\n\n# trailing comment", "\n\na\n\nb  \n\n",
    "x=1\n\ncat <<EOF\n$x\n\nEOF\n\necho", "#!/bin/sh\nset -x\n\necho",
])
def test_split_then_join_gives_the_script_back(script):
    assert join_steps(split_script(script.rstrip("\n"))) == script.rstrip("\n")


@pytest.mark.parametrize("steps", [
    ["a", "b"], ["a\n\nb", "c"], ["#!/bin/bash\na", "b"], ["if x; then\n\n y\nfi", "z"],
])
def test_join_then_split_gives_the_steps_back(steps):
    assert split_script(join_steps(steps)) == steps


# --- fuzz ------------------------------------------------------------------------------


def test_random_cells_fail_only_with_recipe_error_and_split_join_exactly():
    import random
    rng = random.Random(4)
    pieces = ["%layer a", "%from oci ./o:t", "%from", "%import x --dest", "%cmd 'a",
              "%env A=1", "%help", "# c", "", "echo hi", "if x; then", "fi", "cat <<E",
              "E", "'", '"', "\\", "%", "%%", "(", ")", "{", "}", "case x in", "a) ;;",
              "esac", "do", "done", "# %%", "#!/bin/sh", "%labels k=v", "  %cache on"]
    for _ in range(2000):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        try:
            cell = parse_cell(text)
        except RecipeError:
            continue
        script = cell.script.rstrip("\n")
        parts = split_script(script)
        if all(p.strip() for p in parts):  # an empty piece between markers is dropped
            assert split_script(join_steps(parts)) == parts
        if "# %%" not in script:
            assert join_steps(parts) == script


@pytest.mark.parametrize("name", ["..", "a/b", "'a b'", "'-x'", "a..b", "x-"])
def test_layer_names_that_are_no_oci_ref_are_refused(name):
    with pytest.raises(RecipeError, match="cannot be an image tag"):
        parse_cell(f"%layer {name}\n%from scratch")


@pytest.mark.parametrize("name", ["app", "App_2", "v1.0", "a--b", "x@y+z"])
def test_layer_names_that_are_oci_refs_are_accepted(name):
    assert parse_cell(f"%layer {name}").directives[0].args == name
