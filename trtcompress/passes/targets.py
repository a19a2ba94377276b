"""Select the linear layers a pass applies to, by module-name patterns.

A pattern is a glob on the full module name (`*`, `?`, `[...]`; `*` also crosses dots), or a regular
expression when prefixed with `re:`. A bare layer name such as `lm_head` or `down_proj` matches
that name as a suffix component too, so `down_proj` selects every `....mlp.down_proj`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator

from torch import nn

from trtcompress.compressed.linear import CompressedLinear


def check_patterns(patterns: Iterable[str]) -> None:
    """Raise ValueError naming the first `re:` pattern that is not a valid regular expression (so a
    recipe fails when it is validated, not after the model is loaded)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def select_linears(
    model: nn.Module, targets: Iterable[str], exclude: Iterable[str]
) -> Iterator[tuple[str, nn.Module]]:
    """Linear layers (plain or already compressed) whose name matches a target and no exclude pattern."""
    targets, exclude = list(targets), list(exclude)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | CompressedLinear):
            continue
        if matches_any(name, targets) and not matches_any(name, exclude):
            yield name, module
