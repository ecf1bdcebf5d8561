"""stacker's `${{VAR}}` substitution, on the text of a stacker.yaml or a cell.

Apart from recipe/stacker_yaml.py: a notebook's cells are substituted without
loading the YAML parser.
"""
from __future__ import annotations

import re

from stacker_kernel.errors import RecipeError

_REMAINING_DEFAULT = re.compile(r"\$\{\{([^}:]+):([^}]*)\}\}")
_REMAINING_PLAIN = re.compile(r"\$\{\{([^}:]+)\}\}")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def substitute(text: str, subs: dict[str, str], defaults: bool = True, require: bool = True,
               in_kernel: bool = False) -> str:
    """Apply stacker's textual substitutions to a whole stacker.yaml (or a cell).

    Each provided KEY replaces `${{KEY}}` and `${{KEY:default}}`; then every
    remaining `${{NAME:default}}` becomes its default. Raises RecipeError for a
    remaining `${{NAME}}` without default, and (stacker's strictness) when a
    provided KEY also appears as `$KEY`, `${KEY}` or `${KEY:...}`. Without
    `defaults`, only the provided keys are replaced and the other placeholders
    stay (`import` keeps them, so the notebook still builds with other values);
    without `require`, a `${{NAME}}` without value and default stays.
    `in_kernel` words the missing-value error for a cell (no --substitute there).
    """
    for key, value in subs.items():
        k = re.escape(key)
        shell = re.search(rf"\$(?:{k}(?![A-Za-z0-9_])|\{{{k}[}}:])", text)
        if shell:
            raise RecipeError(
                f"line {_line_of(text, shell.start())} uses {shell.group(0).rstrip(':')} for "
                f"the substitution {key}: write ${{{{{key}}}}} instead")
        text = re.sub(rf"\$\{{\{{{k}(:[^}}]*)?\}}\}}", lambda _m: value, text)
    if not defaults:
        return text
    text = _REMAINING_DEFAULT.sub(lambda m: m.group(2), text)
    missing = _REMAINING_PLAIN.search(text)
    if missing and require:
        name = missing.group(1)
        where = f"no value for substitution {name} (line {_line_of(text, missing.start())})"
        if in_kernel:
            raise RecipeError(f"{where}: write ${{{{{name}:default}}}}; the kernel runs it with the "
                              f"default, build -f NOTEBOOK --substitute {name}=VALUE with another value")
        raise RecipeError(f"{where}: pass --substitute {name}=VALUE or write ${{{{{name}:default}}}}")
    return text
