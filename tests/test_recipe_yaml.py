"""stacker.yaml parsing, substitution, dependency order and dumping (pure)."""
import random

import pytest

from acceptance_cases import SC01, SC02, SC03, SC06, SC09, SC13, SC16, y
from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import Bind, ImageSource, Import, Layer, Recipe, Step
from stacker_kernel.recipe.stacker_yaml import (
    dump, load, load_file, load_with_prerequisites, substitute,
)

BUSYBOX = {"BUSYBOX_OCI": "/srv/oci:busybox"}


ALL_CASES = {"SC-01": SC01, "SC-02": SC02, "SC-03": SC03, "SC-06": SC06, "SC-09": SC09,
             "SC-13": SC13, "SC-16": SC16}


def test_sc01_minimal_build_is_one_oci_layer_with_one_step():
    r = load(SC01, BUSYBOX)
    assert list(r.layers) == ["busybox"]
    layer = r.layers["busybox"]
    assert layer.from_ == ImageSource("oci", url="/srv/oci:busybox")
    assert layer.steps == [Step("touch /foo")]


def test_sc02_built_child_starts_from_parent():
    r = load(SC02, BUSYBOX)
    assert r.layers["child"].from_ == ImageSource("built", tag="parent")
    assert r.layers["parent"].run_script() == "touch /root/parent\ncat /proc/self/mountinfo"
    assert r.dependency_order() == ["parent", "child"]


def test_sc03_command_strings_are_shell_split():
    r = load(SC03, BUSYBOX)
    assert r.layers["base"].cmd == ["foo"]
    assert r.layers["base"].entrypoint is None
    assert r.layers["layer1"].entrypoint == ["bar"]
    assert r.layers["layer2"].full_command == ["baz"]
    assert r.dependency_order() == ["base", "layer1", "layer2"]


def test_sc06_tar_base_and_built_chain():
    r = load(SC06)
    assert r.layers["l1"].from_ == ImageSource("tar", url=".stacker/layer-bases/busybox.tar")
    assert r.dependency_order() == ["l1", "l2", "l3", "l4"]
    assert r.layers["l4"].run_script().splitlines()[0] == "[ ! -d /aaa/111 ]"


def test_sc09_import_dest_keeps_trailing_slashes():
    r = load(SC09, BUSYBOX)
    assert r.layers["first"].imports == [Import("folder1/", dest="/folder1/")]
    assert r.layers["fifth"].imports == [
        Import("folder1/subfolder2/", dest="/folder3/"),
        Import("folder1/subfolder2", dest="/folder4"),
        Import("stacker://fourth/folder4/subfolder5/", dest="/folder6/"),
        Import("stacker://fourth/folder4/", dest="/folder7/"),
    ]
    assert r.layers["third"].dependencies() == ["second"]


def test_sc09_order_puts_stacker_url_sources_first():
    order = load(SC09, BUSYBOX).dependency_order()
    assert order.index("second") < order.index("third")
    assert order.index("fourth") < order.index("fifth")


def test_sc13_dependency_order_independent_of_file_order():
    r = load(SC13)
    assert r.dependency_order() == [
        "minbase1", "installer-initrd", "installer-build-env", "installer-initrd-modules",
        "installer-iso-build", "atomix-installer-iso"]


def test_sc13_tar_base_from_stacker_url_is_a_dependency():
    r = load(SC13)
    assert r.layers["atomix-installer-iso"].dependencies() == ["installer-iso-build"]
    assert r.layers["installer-iso-build"].dependencies() == [
        "minbase1", "installer-initrd", "installer-initrd-modules"]


def test_sc13_shebang_run_stays_one_step():
    step = load(SC13).layers["installer-initrd"].steps
    assert len(step) == 1 and step[0].source.startswith("#!/bin/bash -ex\n")


def test_sc16_run_keeps_quotes_verbatim():
    layer = load(SC16, BUSYBOX).layers["test"]
    assert layer.run_script().endswith('echo "build artifact" > /var/data/output.txt')


@pytest.mark.parametrize("case", sorted(ALL_CASES))
def test_acceptance_case_round_trips_through_dump(case):
    r = load(ALL_CASES[case], BUSYBOX)
    again = load(dump(r))
    assert again == r
    assert list(again.layers) == list(r.layers)


# --- SC-NEG ---------------------------------------------------------------------


def test_unknown_directive_is_rejected_naming_it():
    with pytest.raises(RecipeError, match="unknown directive notanentry") as e:
        load("foo:\n    notanentry:\n        foo: bar\n")
    assert "layer foo" in str(e.value) and "line 2" in str(e.value)


def test_built_without_tag_is_rejected(tmp_path):
    (tmp_path / "stacker1.yaml").write_text(
        "layer1:\n    from:\n        type: oci\n        url: ${{BUSYBOX_OCI}}\n")
    (tmp_path / "stacker2.yaml").write_text(y("""
        config:
            prerequisites:
                - stacker1.yaml
        layer2:
            from:
                type: built
                url: ${{BUSYBOX_OCI}}
        """))
    with pytest.raises(RecipeError, match="from tag cannot be empty for image type 'built'"):
        load_with_prerequisites(str(tmp_path / "stacker2.yaml"), BUSYBOX)


def test_colon_in_layer_name_is_forbidden():
    text = "busybox:with:colon:\n    from:\n        type: oci\n        url: ${{BUSYBOX_OCI}}\n" \
           "    run: |\n        touch /foo\n"
    with pytest.raises(RecipeError, match="forbidden"):
        load(text, BUSYBOX)


def test_empty_os_is_rejected():
    text = y("""
        busybox:
            os:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            imports:
                - https://www.cisco.com/favicon.ico
        """)
    with pytest.raises(RecipeError, match='"os" value cannot be empty'):
        load(text, BUSYBOX)


def test_empty_arch_is_rejected():
    with pytest.raises(RecipeError, match='"arch" value cannot be empty'):
        load("a:\n  from: {type: scratch}\n  arch: ''\n")


def test_duplicate_layer_names_are_rejected_with_both_lines():
    text = "a:\n  from: {type: scratch}\nb:\n  from: {type: scratch}\na:\n  from: {type: scratch}\n"
    with pytest.raises(RecipeError, match=r"duplicate layer name a \(lines 1 and 5\)"):
        load(text)


def test_duplicate_directive_in_a_layer_is_rejected():
    with pytest.raises(RecipeError, match="directive run is given twice"):
        load("a:\n  from: {type: scratch}\n  run: x\n  run: y\n")


def test_duplicate_layer_across_prerequisites_is_rejected(tmp_path):
    (tmp_path / "one.yaml").write_text("a:\n  from: {type: scratch}\n")
    (tmp_path / "two.yaml").write_text(
        "config:\n  prerequisites: [one.yaml]\na:\n  from: {type: scratch}\n")
    with pytest.raises(RecipeError, match="duplicate layer name: both .*one.yaml and "
                                          ".*two.yaml have a"):
        load_with_prerequisites(str(tmp_path / "two.yaml"))


def test_missing_built_base_is_unresolvable():
    text = "test:\n  from: {type: built, tag: notatag}\n"
    with pytest.raises(RecipeError, match="couldn't find dependencies for test: base layer "
                                          "notatag") as e:
        load(text)
    assert "couldn't resolve some dependencies" in str(e.value)


def test_unknown_stacker_url_hosts_are_listed():
    text = y("""
        test:
          from: {type: scratch}
          imports:
            - stacker://foo/bar
            - stacker://baz/foo
        """)
    with pytest.raises(RecipeError, match="couldn't find dependencies for test: "
                                          "stacker://foo/bar, stacker://baz/foo"):
        load(text)


def test_dependency_cycle_is_unresolvable():
    text = "a:\n  from: {type: built, tag: b}\nb:\n  from: {type: built, tag: a}\n"
    with pytest.raises(RecipeError, match="couldn't resolve some dependencies"):
        load(text)


def test_invalid_yaml_names_the_line():
    with pytest.raises(RecipeError, match="not valid YAML.*line 3"):
        load("a:\n  from: {type: scratch}\n  run: a: b\n")


def test_import_and_imports_together_are_rejected():
    with pytest.raises(RecipeError, match="'import' and 'imports' cannot be used together"):
        load("a:\n  from: {type: scratch}\n  import: x\n  imports: y\n")


def test_unknown_from_key_is_rejected():
    with pytest.raises(RecipeError, match="unknown image source directive branch"):
        load("a:\n  from: {type: scratch, branch: x}\n")


def test_unknown_from_type_is_rejected():
    with pytest.raises(RecipeError, match="unknown from type 'zot'"):
        load("a:\n  from: {type: zot, url: zot://x}\n")


def test_layer_without_from_is_rejected():
    with pytest.raises(RecipeError, match="has no 'from'"):
        load("a:\n  run: echo\n")


def test_relative_import_dest_is_rejected():
    with pytest.raises(RecipeError, match="'dest' path cannot be relative"):
        load("a:\n  from: {type: scratch}\n  imports:\n    - {path: x, dest: rel}\n")


def test_malformed_import_hash_is_rejected():
    with pytest.raises(RecipeError, match="not a sha256 hex digest"):
        load("a:\n  from: {type: scratch}\n  imports:\n    - {path: x, hash: abc}\n")


def test_imports_as_a_mapping_is_rejected():
    with pytest.raises(RecipeError, match="expected an array"):
        load("a:\n  from: {type: scratch}\n  imports: {path: x}\n")


def test_unbalanced_quote_in_cmd_is_rejected():
    with pytest.raises(RecipeError, match="cmd .*balance the quotes"):
        load("a:\n  from: {type: scratch}\n  cmd: echo 'oops\n")


def test_prerequisite_cycle_is_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("config: {prerequisites: [b.yaml]}\n")
    (tmp_path / "b.yaml").write_text("config: {prerequisites: [a.yaml]}\n")
    with pytest.raises(RecipeError, match="prerequisites form a cycle"):
        load_with_prerequisites(str(tmp_path / "a.yaml"))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(RecipeError, match="cannot read .*nope.yaml"):
        load_file(str(tmp_path / "nope.yaml"))


# --- SC-SUB ----------------------------------------------------------------------


def test_substitution_table_from_stackers_unit_test():
    text = "${{ONE}} ${{TWO:}} ${{TWO:3}} ${{TWO2:22}} ${{THREE:3}} ${{NOTHING:}}"
    assert substitute(text, {"ONE": "1", "TWO": "2", "BLEH": "BLAH"}) == "1 2 2 22 3 "


def test_unset_substitution_without_default_is_an_error_naming_it():
    with pytest.raises(RecipeError, match="no value for substitution NOT_SET"):
        substitute("url: ${{NOT_SET}}", {})


@pytest.mark.parametrize("text", ["echo $A", "echo ${A}", "echo ${A:-x}", "x: $A\n"])
def test_shell_style_use_of_a_provided_substitution_is_an_error(text):
    with pytest.raises(RecipeError, match=r"write \$\{\{A\}\} instead"):
        substitute(text, {"A": "1"})


def test_shell_variables_not_provided_are_left_alone():
    assert substitute("echo $HOME ${PATH} $AB", {"A": "1"}) == "echo $HOME ${PATH} $AB"


def test_substituted_value_is_inserted_literally():
    assert substitute("${{A}}", {"A": r"\1 $x"}) == r"\1 $x"


def test_substitution_happens_before_parsing():
    r = load("a:\n  from: {type: oci, url: '${{U:./oci:base}}'}\n")
    assert r.layers["a"].from_.url == "./oci:base"


# --- every key ----------------------------------------------------------------

EVERY_KEY = y("""
    config:
      prerequisites:
        - base.yaml
    full:
      from:
        type: docker
        url: docker://busybox:latest
        insecure: true
      imports:
        - plain.txt
        - path: conf/
          hash: ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789
          dest: /etc/app/
          mode: 0640
          uid: 1000
          gid: 0
          perms: ignored
      overlay_dirs:
        - source: overlay
          dest: /usr/local
      run:
        - echo one
        - echo two
      cmd: ["/bin/sh", "-c", "echo hi"]
      entrypoint: /init --flag "a b"
      build_env_passthrough: ["http_.*"]
      build_env:
        CC: gcc
        EMPTY:
      environment:
        LANG: C.UTF-8
        VERSION: 1.10
      volumes: [/data, /logs]
      labels:
        org.opencontainers.image.title: full
      generate_labels: |
        echo 1 > /stacker/oci-labels/x
      working_dir: /app
      build_only: yes
      binds:
        - /srv/cache
        - /srv/a -> /a
        - source: /srv/b
          dest: /b
        - source: /srv/c
      runtime_user: "1000"
      annotations:
        org.example: yes
      os: linux
      arch: arm64
      bom:
        generate: true
    """)


def _every():
    return load(EVERY_KEY)


def test_every_key_from_docker_insecure():
    assert _every().layers["full"].from_ == ImageSource("docker", "docker://busybox:latest",
                                                         insecure=True)


def test_every_key_imports_string_and_dict_forms():
    assert _every().layers["full"].imports == [
        Import("plain.txt"),
        Import("conf/", hash="ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789",
               dest="/etc/app/", mode=0o640, uid=1000, gid=0)]


def test_every_key_run_list_is_one_step():
    assert _every().layers["full"].steps == [Step("echo one\necho two")]


def test_every_key_commands():
    layer = _every().layers["full"]
    assert layer.cmd == ["/bin/sh", "-c", "echo hi"]
    assert layer.entrypoint == ["/init", "--flag", "a b"]
    assert layer.full_command is None


def test_every_key_maps_keep_scalars_as_written():
    layer = _every().layers["full"]
    assert layer.environment == {"LANG": "C.UTF-8", "VERSION": "1.10"}
    assert layer.build_env == {"CC": "gcc", "EMPTY": ""}
    assert layer.annotations == {"org.example": "yes"}
    assert layer.labels == {"org.opencontainers.image.title": "full"}


def test_every_key_binds_three_forms():
    assert _every().layers["full"].binds == [
        Bind("/srv/cache", "/srv/cache"), Bind("/srv/a", "/a"), Bind("/srv/b", "/b"),
        Bind("/srv/c", "/srv/c")]


def test_every_key_scalars():
    layer = _every().layers["full"]
    assert (layer.working_dir, layer.runtime_user, layer.os, layer.arch, layer.build_only) == \
        ("/app", "1000", "linux", "arm64", True)
    assert layer.volumes == ["/data", "/logs"]
    assert layer.build_env_passthrough == ["http_.*"]
    assert layer.generate_labels == "echo 1 > /stacker/oci-labels/x"
    assert layer.overlay_dirs == [{"source": "overlay", "dest": "/usr/local"}]


def test_every_key_bom_and_unknown_import_keys_only_warn():
    warnings = _every().layers["full"].warnings
    assert any("bom" in w for w in warnings)
    assert any("perms" in w for w in warnings)


def test_every_key_prerequisites():
    assert _every().prerequisites == ["base.yaml"]


def test_every_key_round_trips_through_dump():
    r = _every()
    assert load(dump(r)) == r


def test_legacy_import_is_marked_and_warned():
    layer = load("a:\n  from: {type: scratch}\n  import:\n    - x\n").layers["a"]
    assert layer.imports == [Import("x", legacy=True)]
    assert any("deprecated" in w for w in layer.warnings)


def test_legacy_import_dumps_under_import():
    r = load("a:\n  from: {type: scratch}\n  import: x\n")
    text = dump(r)
    assert "import:\n" in text and "imports" not in text
    assert load(text) == r


def test_single_string_imports_is_one_import():
    assert load("a:\n  from: {type: scratch}\n  imports: x\n").layers["a"].imports == [Import("x")]


def test_url_on_built_is_ignored_with_a_warning():
    r = load("p:\n  from: {type: scratch}\nc:\n  from: {type: built, tag: p, url: x}\n")
    assert r.layers["c"].from_ == ImageSource("built", tag="p")
    assert r.layers["c"].warnings


def test_unknown_config_keys_are_ignored():
    assert load("config:\n  whatever: 1\na:\n  from: {type: scratch}\n").prerequisites == []


def test_yaml_merge_keys_are_followed():
    text = y("""
        base: &b
          from: {type: oci, url: './oci:x'}
          environment: {A: "1"}
        child:
          <<: *b
          environment: {B: "2"}
        """)
    assert load(text).layers["child"].environment == {"B": "2"}
    assert load(text).layers["child"].from_.url == "./oci:x"


def test_dump_writes_only_non_default_keys():
    r = Recipe({"a": Layer("a", ImageSource("scratch"))})
    assert dump(r) == "a:\n  from:\n    type: scratch\n"


def test_dump_writes_mode_in_octal():
    r = load("a:\n  from: {type: scratch}\n  imports:\n    - {path: x, mode: 0755}\n")
    assert "mode: 0755" in dump(r)


def test_dump_quotes_strings_that_look_like_other_types():
    layer = Layer("a", ImageSource("scratch"), environment={"A": "true", "B": "0755", "C": ""},
                  runtime_user="1000")
    r = Recipe({"a": layer})
    assert load(dump(r)) == r


def test_dump_writes_run_as_a_literal_block():
    r = load(SC02, BUSYBOX)
    assert "run: |\n    touch /root/parent\n    cat /proc/self/mountinfo\n" in dump(r)


def test_prerequisites_resolve_relative_to_declaring_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("base:\n  from: {type: scratch}\n")
    (tmp_path / "sub" / "mid.yaml").write_text(
        "config: {prerequisites: [base.yaml]}\nmid:\n  from: {type: built, tag: base}\n")
    (tmp_path / "top.yaml").write_text(
        "config: {prerequisites: [sub/mid.yaml]}\ntop:\n  from: {type: built, tag: mid}\n"
        "  imports: [stacker://base/etc/passwd]\n")
    recipes = load_with_prerequisites(str(tmp_path / "top.yaml"))
    assert [list(r.layers) for r in recipes] == [["base"], ["mid"], ["top"]]
    assert recipes[-1].external_built() == ["mid", "base"]


def test_prerequisite_layers_must_exist(tmp_path):
    (tmp_path / "base.yaml").write_text("base:\n  from: {type: scratch}\n")
    (tmp_path / "top.yaml").write_text(
        "config: {prerequisites: [base.yaml]}\ntop:\n  from: {type: built, tag: nothere}\n")
    with pytest.raises(RecipeError, match="base layer nothere"):
        load_with_prerequisites(str(tmp_path / "top.yaml"))


def test_resolve_makes_local_paths_absolute_against_the_file():
    r = Recipe(source_path="/work/x/stacker.yaml")
    assert r.resolve("folder1/") == "/work/x/folder1/"
    assert r.resolve("stacker://a/b") == "stacker://a/b"
    assert r.resolve("/abs") == "/abs"


# --- fuzz: never anything but our own error ------------------------------------


def _mutations(text: str, rng: random.Random, n: int):
    alphabet = ":-{}[]|>&*!%@`'\"#\n \t$" + "abcxyz019"
    for _ in range(n):
        chars = list(text)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            pos = rng.randrange(len(chars) + 1)
            if op < 0.4 and chars:
                del chars[min(pos, len(chars) - 1)]
            elif op < 0.8:
                chars.insert(pos, rng.choice(alphabet))
            else:
                chars[pos:pos] = list(rng.choice(["${{X}}", "${{Y:d}}", "<<: *a", "&a ", "~"]))
        yield "".join(chars)


def test_mutated_stacker_files_fail_only_with_recipe_error():
    rng = random.Random(6)
    seen_ok = seen_err = 0
    for base in list(ALL_CASES.values()) + [EVERY_KEY]:
        for text in _mutations(base, rng, 150):
            try:
                r = load(text, BUSYBOX)
            except RecipeError:
                seen_err += 1
                continue
            seen_ok += 1
            assert load(dump(r)) == r
    assert seen_ok and seen_err


def test_an_alias_inside_its_own_anchor_is_refused():
    with pytest.raises(RecipeError, match="refer to itself"):
        load("a: &a {from: {type: scratch}, <<: *a}\n")


def test_aliases_and_merge_keys_that_stay_small_still_work():
    recipe = load("base: &b\n  from: {type: scratch}\n  environment: &env {A: '1'}\n"
                  "app:\n  <<: *b\n  environment: *env\n  run: x\n")
    assert recipe.layers["app"].environment == {"A": "1"}
    assert recipe.layers["app"].from_ == ImageSource("scratch")


@pytest.mark.parametrize("name", ["'..'", "a/b", "'a b'", "'-x'", ".hidden"])
def test_layer_names_that_are_no_oci_ref_are_refused_with_the_line(name):
    with pytest.raises(RecipeError, match=r"layer name .* \(line 3\) cannot be an image tag"):
        load(f"ok:\n  from: {{type: scratch}}\n{name}:\n  from: {{type: scratch}}\n")
