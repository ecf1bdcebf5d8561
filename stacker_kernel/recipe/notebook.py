"""nbformat notebook <-> Recipe.

A notebook is a sequence of layers: `%layer NAME` starts one, every other
recipe magic applies to the current layer, and every code cell's script is a
step of it (docs/architecture.md §1). Importing a stacker.yaml gives, per
layer, a `## Layer NAME` heading, a directive cell and the `run` script cut
into cells (`cells.split_script`).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Mapping

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.cells import (
    HEADLESS_REFUSED, apply_cell, format_directives, format_generate_labels, parse_cell,
    split_script,
)
from stacker_kernel.recipe.model import ImageSource, Layer, Recipe, Step, check_layer_name
from stacker_kernel.recipe.substitution import substitute

if TYPE_CHECKING:  # nbformat (with jsonschema) takes over a second to import: only where needed
    from nbformat import NotebookNode

KERNELSPEC = {"name": "stacker", "display_name": "Stacker (container build)",
              "language": "stacker"}
LANGUAGE_INFO = {"name": "stacker", "codemirror_mode": "shell", "mimetype": "text/x-sh",
                 "file_extension": ".sh", "pygments_lexer": "bash"}


def is_plain_v4(nb: Any) -> bool:
    """Whether `nb` (parsed JSON) is an nbformat 4 notebook in the shape this module reads:
    a list of cells, each with a known type and text source, metadata objects.

    Such a notebook is used as parsed; anything else (another version, a
    broken file) goes through nbformat for its conversion and its messages.
    """
    if not isinstance(nb, dict) or nb.get("nbformat") != 4 or not isinstance(nb.get("metadata", {}), dict):
        return False
    cells = nb.get("cells")
    if not isinstance(cells, list):
        return False
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            return False
        src = cell.get("source")
        if not (isinstance(src, str) or (isinstance(src, list) and all(isinstance(s, str) for s in src))):
            return False
        if not isinstance(cell.get("metadata", {}), dict) or not isinstance(cell.get("id", ""), str):
            return False
        tags = cell.get("metadata", {}).get("tags", [])
        if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            return False
    return True


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


# Cells tagged so (JupyterLab's and nbclient's convention) are expected to fail.
EXPECTED_ERROR_TAG = "raises-exception"


def recipe_from_notebook(nb: Mapping[str, Any], name: str,
                         substitutions: dict[str, str] | None = None) -> Recipe:
    """The Recipe a notebook describes.

    The first layer is named `name` (the notebook's file stem) unless the
    first cell that does anything says `%layer`; a cell's script (if not
    blank) is a Step carrying the cell's id; `%generate_labels` cells give the
    layer's generate_labels script instead; interactive magics and markdown
    are ignored (those of `cells.HEADLESS_REFUSED` are refused: they have no
    meaning without a kernel), and so are cells tagged `raises-exception`
    (expected to fail: demonstrations, not steps). Prerequisites come from
    `metadata.stacker.prerequisites`.
    Cells keep stacker's `${{NAME:default}}` placeholders: with `substitutions`
    (a build) each cell is resolved like a stacker.yaml (given values, then
    defaults); without (an export) they stay, so the yaml has them again.
    Raises RecipeError naming the cell for bad magics, a layer without
    `%from`, a layer name used twice, or unresolvable dependencies.
    """
    recipe = Recipe()
    meta = (nb.get("metadata") or {}).get("stacker") or {}
    prerequisites = meta.get("prerequisites") or [] if isinstance(meta, dict) else None
    if not (isinstance(prerequisites, list) and all(isinstance(p, str) for p in prerequisites)):
        raise RecipeError("the notebook's metadata \"stacker\" must be an object whose \"prerequisites\" "
                          "is a list of stacker.yaml paths: fix it in the notebook's metadata")
    recipe.prerequisites = list(prerequisites)
    current: Layer | None = None
    has_from: dict[str, int] = {}
    started: dict[str, int] = {}
    code_cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    for index, cell in enumerate(code_cells, start=1):
        where = f"code cell {index}" + (f" (id {cell['id']})" if cell.get("id") else "")
        if EXPECTED_ERROR_TAG in ((cell.get("metadata") or {}).get("tags") or []):
            continue  # a cell expected to fail (a demonstration) is no step of the recipe
        try:
            source = _source(cell)
            if substitutions is not None:
                source = substitute(source, substitutions)
            parsed = parse_cell(source)
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
        for d in parsed.directives:
            if d.name in HEADLESS_REFUSED:
                raise RecipeError(f"{where} uses %{d.name}, {HEADLESS_REFUSED[d.name]}")
        directives = parsed.recipe_directives()
        is_labels = any(d.name == "generate_labels" for d in directives)
        script = parsed.script.rstrip()
        if not directives and not script.strip():
            continue
        if directives and directives[0].name == "layer":
            new_name = directives[0].args
            if new_name in started:
                raise RecipeError(f"{where}: layer {new_name} is already started in code cell "
                                  f"{started[new_name]}: give this layer another name")
            current = Layer(new_name, ImageSource("scratch"))
            recipe.layers[new_name] = current
            started[new_name] = index
        elif current is None:
            check_layer_name(name, " (the notebook's name)")
            current = Layer(name, ImageSource("scratch"))
            recipe.layers[name] = current
            started[name] = index
        if any(d.name == "from" for d in directives):
            has_from[current.name] = index
        try:
            current = apply_cell(current, parsed)
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
        recipe.layers[current.name] = current
        if script.strip() and not is_labels:
            if current.steps and script.startswith("#!"):
                current.warnings.append(
                    f"{where} starts with #! but is not the layer's first step: in the "
                    "exported run script it runs under the first step's interpreter "
                    "(export --per-cell keeps it separate)")
            current.steps.append(Step(script, cell.get("id")))
    for layer_name, first in started.items():
        if layer_name not in has_from:
            raise RecipeError(f"layer {layer_name} (code cell {first}) has no %from: add "
                              "'%from TYPE ...' to its first cell, e.g. %from oci ./oci:busybox")
    recipe.dependency_order()
    return recipe


def _cell_id(used: set[str], wanted: str | None, seed: str) -> str:
    """A cell id valid for nbformat 4.5, unique in the notebook, stable for `seed`."""
    if wanted and wanted not in used:
        used.add(wanted)
        return wanted
    n = 0
    while True:
        cid = hashlib.sha1(f"{seed}\0{n}".encode()).hexdigest()[:12]
        if cid not in used:
            used.add(cid)
            return cid
        n += 1


def notebook_from_recipe(recipe: Recipe) -> "NotebookNode":
    """A notebook for `recipe`: per layer a `## Layer NAME` heading, a directive
    cell and one code cell per step.

    Steps from a notebook (with a cell id) stay one cell each, with their id;
    steps from a stacker.yaml are cut with `split_script` (at empty lines, or
    `# %%` markers; a `#!` script stays whole). Cell ids are deterministic, so
    importing the same file twice gives the same notebook.
    """
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    if recipe.prerequisites:
        nb.metadata["stacker"] = {"prerequisites": list(recipe.prerequisites)}
    used: set[str] = set()
    for name, layer in recipe.layers.items():
        cells = [nbformat.v4.new_markdown_cell(f"## Layer {name}"),
                 nbformat.v4.new_code_cell(format_directives(layer))]
        for i, cell in enumerate(cells):
            cell["id"] = _cell_id(used, None, f"{name}\0head{i}")
        n = 0
        for step in layer.steps:
            pieces = [step.source] if step.cell_id else split_script(step.source)
            for piece in pieces:
                cell = nbformat.v4.new_code_cell(piece)
                cell["id"] = _cell_id(used, step.cell_id, f"{name}\0step{n}")
                cells.append(cell)
                n += 1
        labels = format_generate_labels(layer)
        if labels is not None:
            cell = nbformat.v4.new_code_cell(labels)
            cell["id"] = _cell_id(used, None, f"{name}\0labels")
            cells.append(cell)
        nb.cells.extend(cells)
    return nb
