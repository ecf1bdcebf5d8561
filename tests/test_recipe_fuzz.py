"""Property-based fuzz of the parsers: any input ends in a recipe or in our own
one-line RecipeError, never in another exception."""
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.cells import parse_cell
from stacker_kernel.recipe.stacker_yaml import dump, load

KEYS = ["from", "run", "imports", "import", "cmd", "entrypoint", "full_command", "environment",
        "labels", "volumes", "working_dir", "build_only", "binds", "build_env",
        "build_env_passthrough", "runtime_user", "annotations", "os", "arch", "generate_labels",
        "overlay_dirs", "bom", "type", "url", "tag", "path", "dest", "hash", "mode", "uid", "gid",
        "config", "prerequisites", "nonsense"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
                    st.sampled_from(["oci", "built", "tar", "scratch", "docker", "a:b", "${{X}}",
                                     "${{X:d}}", "/a/", "stacker://l/p"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=12)
documents = st.dictionaries(st.one_of(st.sampled_from(["a", "b", "c:d", "config"]), st.text(max_size=5)),
                            st.dictionaries(st.sampled_from(KEYS), values, max_size=6), max_size=4)


def one_line(e: Exception) -> bool:
    return bool(str(e).strip())


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_structured_yaml_loads_or_gives_our_error(doc):
    text = yaml.safe_dump(doc)
    try:
        recipe = load(text, {"X": "1"})
    except RecipeError as e:
        assert one_line(e)
        return
    assert load(dump(recipe), {"X": "1"}) == recipe


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_gives_our_error(text):
    try:
        load(text, {})
    except RecipeError as e:
        assert one_line(e)


magic_lines = st.lists(st.one_of(
    st.builds(lambda m, a: f"%{m} {a}", st.sampled_from(
        ["layer", "from", "import", "build_env", "binds", "environment", "labels", "cmd", "entrypoint",
         "full_command", "working_dir", "volumes", "runtime_user", "annotations", "build_only", "os",
         "arch", "rollback", "layers", "diff", "grab", "browse", "export", "keep_failed", "cache", "log",
         "network", "help", "nope"]), st.text(max_size=20)),
    st.text(max_size=30)), max_size=6)


@settings(max_examples=500, deadline=None, database=None)
@given(magic_lines)
def test_cells_parse_or_give_our_error(lines):
    try:
        cell = parse_cell("\n".join(lines))
    except RecipeError as e:
        assert one_line(e)
        return
    assert isinstance(cell.script, str)
