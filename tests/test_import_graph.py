"""The package's import graph: no cycles between subpackages, no hidden imports.

Walks every module of ``tide_jax`` with ``ast`` (nothing is imported). A node is a
subpackage (``tide_jax.distill``) or a top-level module (``tide_jax.main``); an edge is an
import of one node by a module of another. ``__main__`` modules are command-line
entrypoints that nothing imports, so their edges do not count. Imports of ``tide_jax``
inside functions are not allowed anywhere: they hide cycles and broken calls.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tide_jax")


def modules():
  for folder, _, files in os.walk(ROOT):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        yield ".".join(parts), path


def node_of(module: str) -> str:
  return ".".join(module.split(".")[:2])


def imported(tree: ast.AST, module: str):
  """``(imported module, line, inside a function)`` for every import of tide_jax."""
  package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base])
        out.extend((f"{base}.{a.name}", child.lineno, in_function) for a in child.names)
      visit(child, nested)

  visit(tree, False)
  return [(name, line, inner) for name, line, inner in out if name.startswith("tide_jax.")]


def graph():
  edges, hidden = {}, []
  for module, path in modules():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for name, line, inner in imported(tree, module):
      if inner:
        hidden.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line} imports {name}")
      if module.endswith("__main__"):
        continue
      src, dst = node_of(module), node_of(name)
      if src != dst:
        edges.setdefault(src, set()).add(dst)
  return edges, hidden


def find_cycle(edges):
  state, stack = {}, []

  def dfs(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = dfs(nxt)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(edges):
    if node not in state:
      found = dfs(node)
      if found:
        return found
  return None


def test_no_import_cycle_between_subpackages():
  edges, _ = graph()
  assert "tide_jax.train" in edges and "tide_jax.distill" in edges["tide_jax.train"]
  assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_no_function_level_imports_of_the_package():
  _, hidden = graph()
  assert not hidden, "\n".join(hidden)


def test_the_checker_sees_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
