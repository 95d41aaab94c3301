"""Modules meet through public names: no underscore name, no CLI module, used across modules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("iotpipe", "edge", "bridge", "consumers", "simulator")


# (importing module, name): private hooks another change is moving behind a public seam.
# Remove an entry when its import is gone; the stale-entry test below insists on it.
def _modules() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[str, str]]:
    """Every import of our own modules in the file, as (module, name); ``import m`` gives (m, "")."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (
                (alias.name, "") for alias in node.names if alias.name.split(".")[0] in PACKAGES
            )
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        if module.split(".")[0] in PACKAGES:
            yield from ((module, alias.name) for alias in node.names)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_cli(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return leaf in {"cli", "__main__"} or leaf.endswith("_cli")


def _private_imports() -> set[tuple[str, str]]:
    found = set()
    for path in _modules():
        where = path.relative_to(ROOT).as_posix()
        found.update((where, name) for module, name in _imports(path) if _is_private(name))
    return found


def test_no_private_name_is_imported_from_another_module() -> None:
    """Production modules import only public names from iotpipe and the components."""
    unexpected = sorted(_private_imports())
    assert not unexpected, f"private names imported across modules: {unexpected}"


def test_only_cli_modules_import_cli_modules() -> None:
    """Library code never uses a command module (``cli``, ``*_cli``) as a library."""
    offenders = []
    for path in _modules():
        if _is_cli(path.stem):
            continue
        offenders.extend(
            f"{path.relative_to(ROOT).as_posix()} imports {module}"
            for module, name in _imports(path)
            if _is_cli(module) or _is_cli(name)
        )
    assert not offenders, offenders
