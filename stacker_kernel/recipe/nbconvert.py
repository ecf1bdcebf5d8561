"""Notebook -> stacker.yaml, as the `--to stacker` exporter does it.

Two shapes: the default concatenates a layer's cells into one `run` (the same
build under the step semantics of docs/architecture.md §1), `--per-cell` gives each cell its own
stacker layer, chained with `from: built`.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from nbconvert.exporters import Exporter

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import ImageSource, Layer, Recipe
from stacker_kernel.recipe.notebook import recipe_from_notebook
from stacker_kernel.recipe.stacker_yaml import dump

# What a per-cell layer keeps from its notebook layer: what every step needs
# while it runs. Image config goes only to the last layer, `dest` imports and
# overlay_dirs (content) only to the first.
_BUILD_TIME = ("build_env", "build_env_passthrough", "binds", "os", "arch")


def notebook_to_stacker_yaml(nb: Mapping[str, Any], name: str, per_cell: bool = False) -> str:
    """The stacker.yaml text of a notebook named `name` (its file stem)."""
    recipe = recipe_from_notebook(nb, name)
    return dump(recipe_per_cell(recipe) if per_cell else recipe)


def _split_layer(layer: Layer, taken: set[str]) -> list[Layer]:
    n = len(layer.steps)
    if n <= 1:
        return [layer]
    chain: list[Layer] = []
    step_imports = [i for i in layer.imports if i.dest is None]
    for index, step in enumerate(layer.steps, start=1):
        last = index == n
        name = layer.name if last else f"{layer.name}-cell-{index}"
        if not last and name in taken:
            raise RecipeError(f"--per-cell: layer {name} already exists, so layer "
                              f"{layer.name} cannot be split: rename one of them")
        if last:
            part = copy.deepcopy(layer)
            part.imports = copy.deepcopy(step_imports)
            part.overlay_dirs = []
            part.warnings = list(layer.warnings) + [
                "per-cell export: each cell is its own stacker layer, so shell variables "
                "and the working directory do not carry from one cell to the next"]
        else:
            part = Layer(name, ImageSource("scratch"), build_only=True)
            for key in _BUILD_TIME:
                setattr(part, key, copy.deepcopy(getattr(layer, key)))
            part.imports = copy.deepcopy(layer.imports if index == 1 else step_imports)
            if index == 1:
                part.overlay_dirs = copy.deepcopy(layer.overlay_dirs)
        part.from_ = copy.deepcopy(layer.from_) if index == 1 else \
            ImageSource("built", tag=chain[-1].name)
        part.steps = [copy.deepcopy(step)]
        chain.append(part)
    return chain


def recipe_per_cell(recipe: Recipe) -> Recipe:
    """`recipe` with every layer of several steps cut into one layer per step.

    Layer L with steps s1..sn becomes build_only layers L-cell-1 ..
    L-cell-(n-1), each `from: built` the previous, and a last layer named L
    that runs sn and carries L's image config and build_only flag, so other
    layers' references to L still hold. Each keeps what its step needs while
    running (build env, binds, imports without dest); `dest` imports and
    overlay_dirs go to the first, whose base is L's base.
    """
    taken = set(recipe.layers)
    out = Recipe(prerequisites=list(recipe.prerequisites), source_path=recipe.source_path)
    for layer in recipe.layers.values():
        for part in _split_layer(layer, taken):
            out.layers[part.name] = part
            taken.add(part.name)
    out.dependency_order()
    return out


class StackerExporter(Exporter):
    """`jupyter nbconvert --to stacker NB.ipynb` writes NB.stacker.yaml."""

    export_from_notebook = "stacker.yaml"
    output_mimetype = "text/yaml"

    def _file_extension_default(self) -> str:
        return ".stacker.yaml"

    def from_notebook_node(self, nb, resources=None, **kw):
        nb_copy, resources = super().from_notebook_node(nb, resources, **kw)
        name = (resources.get("metadata") or {}).get("name") or "notebook"
        return notebook_to_stacker_yaml(nb_copy, name), resources


class DockerfileExporter(Exporter):
    """`jupyter nbconvert --to dockerfile NB.ipynb` writes NB.Dockerfile (context: its folder)."""

    export_from_notebook = "Dockerfile"
    output_mimetype = "text/x-dockerfile"

    def _file_extension_default(self) -> str:
        return ".Dockerfile"

    def from_notebook_node(self, nb, resources=None, **kw):
        from stacker_kernel.recipe.dockerfile_out import notebook_to_dockerfile

        nb_copy, resources = super().from_notebook_node(nb, resources, **kw)
        name = (resources.get("metadata") or {}).get("name") or "notebook"
        return notebook_to_dockerfile(nb_copy, name), resources
