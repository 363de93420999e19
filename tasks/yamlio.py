"""YAML reading with a bound on what aliases can expand to.

`yaml.safe_load` constructs no objects of arbitrary types, but it does follow anchors and
aliases: nine nested aliases of nine items each ("billion laughs") are 300 bytes of text that
describe 387 million nodes. PyYAML shares the aliased objects, so loading itself is cheap, but
the first code that walks the result (a deep copy, `dataclasses.asdict`, a JSON dump for the
config hash) hangs or runs out of memory. Here the composed node graph is measured with
aliases expanded, before anything is constructed; a document over the bound is refused in
time linear in its text.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_EXPANDED_NODES = 50_000  # a task spec has ~100 nodes; generous for metric options and lists


class YAMLLimitError(ValueError):
    """The document expands to more nodes than MAX_EXPANDED_NODES (an alias bomb) or nests too deep."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_EXPANDED_NODES) -> int:
    """Nodes in the document with every alias expanded (memoised per node, so linear in the text).

    Iterative post-order: a document nested thousands deep must not hit Python's recursion limit
    here (the composer above would already have refused it)."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if expanded:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > limit:
                raise YAMLLimitError(f"aliases expand to more than {limit} nodes (an alias bomb?)")
            continue
        if key in size:
            continue
        if key in on_path:  # a recursive alias (`&a [*a]`): infinite when expanded
            raise YAMLLimitError("a recursive alias (an anchor used inside itself)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)
    return size[id(root)]


def safe_load(text: str, limit: int = MAX_EXPANDED_NODES) -> Any:
    """`yaml.safe_load`, refusing documents whose aliases expand beyond `limit` nodes.

    Raises yaml.YAMLError for malformed text (callers name the file and line) and
    YAMLLimitError for a document over the bound."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YAMLLimitError("nested too deeply") from None
        if node is None:
            return None
        expanded_size(node, limit)
        return loader.construct_document(node)
    finally:
        loader.dispose()
