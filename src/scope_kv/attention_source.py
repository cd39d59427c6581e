"""What an attention module's own code does with the cache, read before any token runs.

A model may route its attention through transformers' ``AttentionInterface`` and still do
something scope_kv cannot follow: attend twice per layer, transform the cached keys before
attending, compute the attention in its own code, or write cache layers other than its own. Each
of these shows in the source of the module's ``forward``, around the call that updates the cache,
so :func:`unmanageable_reason` reads that source (no per-architecture code: the same four patterns
for every model) and the cache refuses such a model when it is built. Where the source cannot be
read, nothing is refused here; the attention function's run-time checks still refuse such a
model at its first forward, before any token.

Only what is certain is refused: a forward without a cache update of three positional arguments
is not judged, and a transformation of the keys counts only where it runs on every path that
updates the cache.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch

__all__ = ["unmanageable_reason"]

_INTERFACE = "ALL_ATTENTION_FUNCTIONS"
_EAGER = "eager_attention_forward"


def _forward_tree(module_type: type[torch.nn.Module]) -> ast.FunctionDef | None:
    """The parsed ``forward`` of ``module_type`` (``None`` where its source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(module_type.forward))
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    return node if isinstance(node, ast.FunctionDef) else None


def _class_source(module_type: type) -> str:
    try:
        return inspect.getsource(module_type)
    except (OSError, TypeError):
        return _INTERFACE  # unreadable: treated as reaching the interface (nothing refused)


def _is_cache_update(node: ast.AST) -> bool:
    """``something.update(keys, values, layer_index, ...)``: how transformers' models write the cache."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "update"
        and len(node.args) >= 3
    )


def _names(target: ast.expr) -> set[str]:
    elements = target.elts if isinstance(target, ast.Tuple) else [target]
    return {e.id for e in elements if isinstance(e, ast.Name)}


def _conditions(tree: ast.FunctionDef) -> dict[ast.AST, frozenset[ast.AST]]:
    """For every statement of the function, the branches (``if`` / loop / ``with`` / ``try`` nodes) it
    sits inside."""
    inside: dict[ast.AST, frozenset[ast.AST]] = {}

    def walk(node: ast.AST, enclosing: frozenset[ast.AST]) -> None:
        for child in ast.iter_child_nodes(node):
            inside[child] = enclosing
            branches = (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.Match)
            walk(child, enclosing | {child} if isinstance(child, branches) else enclosing)

    walk(tree, frozenset())
    return inside


def _attention_functions(tree: ast.FunctionDef) -> set[str]:
    """Names the forward binds to an attention function of transformers' interface."""
    names = {_EAGER}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            value, targets = node.value, node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            value, targets = node.value, [node.target]
        else:
            continue
        if _INTERFACE in ast.unparse(value):
            for target in targets:
                names |= _names(target)
    return names


def _reads(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


def unmanageable_reason(module_type: type[torch.nn.Module]) -> str | None:
    """Why ScopeCache cannot manage attention modules of ``module_type``, read from the source of
    their ``forward``; ``None`` when nothing there says so (or the source cannot be read).

    Parameters
    ----------
    module_type : type
        The class of an attention module (a module carrying a ``layer_idx``).

    Returns
    -------
    str or None
        The reason, as a clause: "its attention modules call the attention function 2 times per layer".
    """
    tree = _forward_tree(module_type)
    if tree is None:
        return None
    updates = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and _is_cache_update(n.value)]
    if not updates:
        return None
    indices = [u.value.args[2] for u in updates if isinstance(u.value, ast.Call)]
    if any(isinstance(i, ast.BinOp) for i in indices):
        index = ast.unparse(indices[0])
        return (
            f"its attention modules write the cache layer at {index}, not at their own layer_idx (looped or "
            "recurrent depth adding cache layers during the forward)"
        )
    functions = _attention_functions(tree)
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in functions
    ]
    if not calls:
        if _INTERFACE in _class_source(module_type):
            return None  # the interface is reached from another method of the module: not judged here
        return "it does not dispatch attention through transformers' AttentionInterface (its attention modules compute it in their own code)"
    if len(calls) > 1:
        return f"its attention modules call the attention function {len(calls)} times per layer"
    cached = set().union(*(_names(t) for u in updates for t in u.targets))
    inside = _conditions(tree)
    first, call_line = min(u.lineno for u in updates), calls[0].lineno
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign) or node in updates or not first < node.lineno < call_line:
            continue
        changed = set().union(*(_names(t) for t in node.targets)) & cached
        always = all(inside[node] <= inside[u] for u in updates)  # runs wherever an update does
        if changed and always and _reads(node.value, changed):
            return (
                f"its attention modules transform the cached {sorted(changed)[0]!r} before attending "
                f"({ast.unparse(node)[:80]})"
            )
    return None
