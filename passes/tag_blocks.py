"""Find the repeated transformer blocks in a graph Dynamo captured.

Dynamo records, on every node, the stack of modules whose ``forward`` produced it
(``node.meta["nn_module_stack"]``). A transformer block is a child ``<container>.<k>`` of a
container that is never called itself (an ``nn.ModuleList``: only its children run), that has
at least two children of the same class, and whose children are not plain ``torch.nn`` layers.
No attribute name is assumed, so ``transformer_blocks``, ``single_transformer_blocks``,
``blocks``, ``layers`` or a user's ``stages`` are all found, and interleaved lists (Latte's
spatial and temporal blocks) come out in the order they run.

The pass writes ``node.meta["blockdance_block"] = k`` (position in execution order) on every
compute node of block ``k`` and returns the blocks.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx

log = logging.getLogger(__name__)

BLOCK_META = "blockdance_block"

_DICT_KEY = re.compile(r"""\.(?:__dict__\[['"]_modules['"]\]|_modules)\[['"]([^'"]+)['"]\]""")
_GETATTR = re.compile(r"""\[['"]([^'"]+)['"]\]""")
_INDEX = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Block:
    """One transformer block: its module path, class name and compute nodes (graph order)."""

    index: int
    name: str
    cls: str
    nodes: tuple[fx.Node, ...]


def normalize_module_path(path: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].3.attn`` -> ``blocks.3.attn``;
    ``L['stages'][3].norm1`` (after a graph break) -> ``stages.3.norm1``."""
    path = _DICT_KEY.sub(r".\1", path)
    path = re.sub(r"^L\[['\"]self['\"]\]", "", path)
    path = re.sub(r"^L\[['\"](\w+)['\"]\]", r"\1", path)  # a module passed as an argument
    path = _GETATTR.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)  # a list of blocks held in a local: L['stages'][3]
    # A forward wrapped by a hook that keeps the bound method (diffusers' context-parallel
    # hooks): function_reference.forward.__self__.transformer_blocks.0 -> transformer_blocks.0
    path = re.sub(r"^.*\.__self__\.", "", path)
    return path.lstrip(".")


def _class_name(cls: object) -> str:
    if isinstance(cls, type):
        return f"{cls.__module__}.{cls.__qualname__}"
    return str(cls)


def _module_stack(node: fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    return [(normalize_module_path(path), _class_name(cls)) for path, cls in stack.values()]


def _block_of(stack: list[tuple[str, str]]) -> tuple[str, int, str] | None:
    """The outermost ``<container>.<k>`` entry of a module stack whose container is not called."""
    called = {path for path, _ in stack}
    for path, cls in stack:
        container, _, last = path.rpartition(".")
        if last.isdigit() and container and container not in called:
            return container, int(last), cls
    return None


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """The transformer blocks of ``gm`` in execution order, without modifying the graph."""
    members: dict[tuple[str, int], list[fx.Node]] = defaultdict(list)
    classes: dict[str, dict[int, str]] = defaultdict(dict)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        found = _block_of(_module_stack(node))
        if found is None:
            continue
        container, k, cls = found
        members[(container, k)].append(node)
        classes[container][k] = cls

    def is_block_list(container: str) -> bool:
        counts: dict[str, int] = defaultdict(int)
        for cls in classes[container].values():
            counts[cls] += 1
        cls, n = max(counts.items(), key=lambda kv: kv[1])
        if n < 2:
            log.debug(
                "blockdance: %s has no two children of one class; not a block list", container
            )
            return False
        if cls.startswith("torch.nn.modules."):
            log.debug("blockdance: %s holds plain torch.nn layers (%s); not blocks", container, cls)
            return False
        return True

    lists = {c for c in classes if is_block_list(c)}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    keys = sorted(
        (key for key in members if key[0] in lists), key=lambda key: order[members[key][0]]
    )
    return [
        Block(i, f"{c}.{k}", classes[c][k], tuple(members[(c, k)])) for i, (c, k) in enumerate(keys)
    ]


def tag_blocks(gm: fx.GraphModule) -> list[Block]:
    """Tag every compute node of a block with its execution-order index; return the blocks."""
    blocks = find_blocks(gm)
    for block in blocks:
        for node in block.nodes:
            node.meta[BLOCK_META] = block.index
    log.debug("blockdance: found %d blocks: %s", len(blocks), [b.name for b in blocks])
    return blocks
