"""Why a graph fell back, in the user's words, and whether to say it again.

The passes only see one graph, so their reason ("expected at least 2 transformer blocks in the
graph, found 0") is true but does not say what the user did to get there. When a graph holds
fewer than 2 blocks, ``explain_fallback`` looks at the model around it for the usual causes, in
this order:

1. regional compilation: ``compile_repeated_blocks`` (or ``torch.compile`` on each block) hands
   the backend one block at a time;
2. a diffusers cache hook (``model.enable_cache(FirstBlockCacheConfig(...))``, ...): its
   ``torch.compiler.disable``'d decision breaks the graph inside the block loop;
3. diffusers group offloading: its hooks break the graph between the blocks;
4. a model whose block lists hold one block each.

A named cause is warned about once per compiled model (the outermost module on the Python stack
that holds the graph's owner), however many graph pieces fall back for it; an unnamed one once
per graph, as before. Only attributes are read (``_diffusers_hook``, ``_cache_config``,
``_repeated_blocks``): diffusers is never imported here.
"""

from __future__ import annotations

import logging
import sys
import types
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes import find_blocks

log = logging.getLogger(__name__)

REGIONAL = "regional compilation"
CACHE_HOOK = "diffusers cache hook"
GROUP_OFFLOADING = "group offloading"
ONE_BLOCK = "one block per list"

#: diffusers hook-name prefixes (``diffusers.hooks.*``) of the caches that skip blocks themselves
_CACHE_HOOKS = {
    "fbc_": "FirstBlockCache",
    "faster_cache": "FasterCache",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "mag_cache": "MagCache",
    "sea_cache": "SeaCache",
    "taylorseer_cache": "TaylorSeerCache",
}
_OFFLOAD_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading")

#: compiled model -> the causes already warned about
_WARNED: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Fallback:
    """Why one graph is left uncached: ``text`` for the warning or ``BlockDanceError``."""

    text: str
    cause: str | None = None  #: one of the causes above; None: only the graph's own reason
    model: torch.nn.Module | None = None  #: the compiled model the cause belongs to

    def first(self) -> bool:
        """Whether this is the first time ``cause`` is told for ``model`` (and note it)."""
        if self.cause is None or self.model is None:
            return True
        told = _WARNED.setdefault(self.model, set())
        if self.cause in told:
            return False
        told.add(self.cause)
        return True


def explain_fallback(gm: fx.GraphModule, owner: torch.nn.Module | None, reason: str) -> Fallback:
    """Why ``gm`` (of ``owner``, ``backend.graph_owner``) fell back: a known cause in words, or
    the passes' ``reason`` as it is. Never raises: looking around is only a courtesy."""
    if owner is None or len(find_blocks(gm)) >= 2:
        return Fallback(reason)
    try:
        return _explain(owner, reason)
    except Exception as e:  # a model this reading did not foresee: keep the passes' reason
        log.debug("blockdance: could not look for a fallback's cause: %r", e)
        return Fallback(reason)


def _explain(owner: torch.nn.Module, reason: str) -> Fallback:
    stack = _modules_on_stack()
    inner = _unwrap(owner)
    model = next((m for m in reversed(stack) if _holds(m, inner)), owner)
    root = _unwrap(model)
    name = type(root).__name__

    if root is not inner and _is_block(inner, stack):
        text = (
            f"regional compilation (compile_repeated_blocks, or torch.compile on each block) "
            f"hands blockdance one {type(inner).__name__} at a time, so there is nothing to "
            "skip: compile the whole transformer with torch.compile(model, "
            "backend='blockdance') instead"
        )
        return Fallback(text, REGIONAL, model)
    hooks = _hook_names(root)
    cache = _cache_method(root, hooks)
    if cache is not None:
        text = (
            f"{name} has a diffusers cache hook ({cache}), whose skip decision breaks the graph "
            "inside the block loop, so no graph holds 2 blocks: remove the diffusers cache hook "
            "(model.disable_cache()), blockdance is itself a cache"
        )
        return Fallback(text, CACHE_HOOK, model)
    if any(h in _OFFLOAD_HOOKS for h in hooks):
        text = (
            f"diffusers group offloading (enable_group_offload / apply_group_offloading) on "
            f"{name} breaks the graph between the blocks, so no graph holds 2 blocks: disable "
            "group offloading (model CPU offload keeps the blocks in one graph), or compile "
            "without blockdance"
        )
        return Fallback(text, GROUP_OFFLOADING, model)
    lists = _block_lists(root)
    if lists and max(len(m) for m in lists.values()) < 2:
        said = ", ".join(f"{path}: {len(m)}" for path, m in lists.items())
        text = (
            f"{name}'s block list(s) hold one block each ({said}); blockdance reuses blocks "
            "0..i and recomputes the rest, so it needs at least 2 blocks in one list: use a "
            "model with 2 or more blocks, or compile this one without blockdance"
        )
        return Fallback(text, ONE_BLOCK, model)
    return Fallback(reason)


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(m, "_orig_mod", m)  # torch.compile's OptimizedModule
    return inner if isinstance(inner, torch.nn.Module) else m


def _modules_on_stack() -> list[torch.nn.Module]:
    """The modules whose methods are on the Python stack, innermost first."""
    found: list[torch.nn.Module] = []
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        m = frame.f_locals.get("self")
        if isinstance(m, torch.nn.Module) and not any(m is f for f in found):
            found.append(m)
        frame = frame.f_back
    return found


def _holds(outer: torch.nn.Module, m: torch.nn.Module) -> bool:
    return any(sub is m for sub in outer.modules())


def _is_block(m: torch.nn.Module, stack: list[torch.nn.Module]) -> bool:
    """Whether ``m`` is one block of a model on the stack: named in its ``_repeated_blocks``
    (diffusers), or an element of one of its ``ModuleList``s."""
    for outer in stack:
        outer = _unwrap(outer)
        if outer is m:
            continue
        if type(m).__name__ in (getattr(outer, "_repeated_blocks", None) or ()):
            return True
        for sub in outer.modules():
            if isinstance(sub, torch.nn.ModuleList) and any(_unwrap(c) is m for c in sub):
                return True
    return False


def _hook_names(root: torch.nn.Module) -> set[str]:
    """The names of the diffusers hooks (``HookRegistry`` in ``_diffusers_hook``) in ``root``."""
    names: set[str] = set()
    for m in root.modules():
        hooks = getattr(getattr(m, "_diffusers_hook", None), "hooks", None)
        if isinstance(hooks, dict):
            names.update(str(k) for k in hooks)
    return names


def _cache_method(root: torch.nn.Module, hooks: set[str]) -> str | None:
    config = getattr(root, "_cache_config", None)  # diffusers' CacheMixin.enable_cache
    if config is not None:
        return type(config).__name__.removesuffix("Config")
    for hook in sorted(hooks):
        for prefix, method in _CACHE_HOOKS.items():
            if hook.startswith(prefix):
                return method
    return None


def _block_lists(root: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The ``ModuleList``s of ``root`` that look like block lists: children of one class that is
    not a plain ``torch.nn`` layer (the rule of ``passes.tag_blocks``, without the count)."""
    lists: dict[str, torch.nn.ModuleList] = {}
    for path, m in root.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) == 0:
            continue
        classes = {type(c) for c in m}
        if len(classes) == 1 and not next(iter(classes)).__module__.startswith("torch.nn."):
            lists[path] = m
    return lists
