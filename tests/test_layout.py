"""The package's layout: which module may import which, package docstrings, and long modules.

Every module of `memcity_pipeline/` is parsed with `ast`; every import counts, at module level
or inside a function (and `importlib.import_module("...")` with a literal name). The layers, top
to bottom; a module may import its own layer and the layers below it, never one above:

    definitions, settings, cli, api, defs, resources,
    rlm, search, enrichment, ingestion, llm, lake, sandbox,   (the domain packages)
    retry, progress, postgres

Two upward edges are allowed: `settings` is read by `definitions`, `cli` and `api` (and by no one
else), and `cli` runs the jobs of `definitions` (the one code location) through the instance. The domain packages also never import `dagster` (or a `dagster_*` package), and the leaves
import nothing of the project: `retry` only the standard library and tenacity, `progress` only
the standard library, `postgres` only the standard library and psycopg.

Every package's `__init__.py` has a docstring, and a module over `MAX_LINES` lines says in its
module docstring why it "stays whole".

A case that breaks a rule today and belongs to someone else is listed in `KNOWN_EXCEPTIONS` or
`KNOWN_LONG_MODULES` with the reason; an entry that no longer matches a real violation fails
`test_known_exceptions_are_still_needed`, so those lists only shrink.
"""

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "memcity_pipeline"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 400
STAYS_WHOLE = "stays whole"

LAYERS: tuple[str, ...] = (
    "definitions",
    "settings",
    "cli",
    "api",
    "defs",
    "resources",
    "rlm",
    "search",
    "enrichment",
    "ingestion",
    "llm",
    "lake",
    "sandbox",
    "retry",
    "progress",
    "postgres",
)
DOMAIN: frozenset[str] = frozenset(
    {"rlm", "search", "enrichment", "ingestion", "llm", "lake", "sandbox"}
)
SETTINGS_READERS: frozenset[str] = frozenset({"definitions", "cli", "api"})
# The CLI runs the one code location's jobs (`build_definitions`, `dg.reconstructable`).
DEFINITIONS_USERS: frozenset[str] = frozenset({"cli"})
# The leaves import nothing of the project, and only these packages besides the standard library.
LEAVES: dict[str, frozenset[str]] = {
    "retry": frozenset({"tenacity"}),
    "progress": frozenset(),
    "postgres": frozenset({"psycopg"}),
}

# (importing module, imported module) -> why it is allowed for now. Each entry names one edge.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}

# Modules over MAX_LINES whose docstring does not say why they stay whole yet -> why listed.
KNOWN_LONG_MODULES: dict[str, str] = {}

# Package `__init__.py` files without a docstring -> why listed.
KNOWN_MISSING_DOCSTRINGS: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    """One import found in a module: what it names, where."""

    module: str  # the importing module, dotted
    target: str  # the imported module, dotted and absolute
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT.parent)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULE_PATHS: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base.pop()
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(path: Path) -> list[Import]:
    """Every import of one module, module-level and function-level alike."""
    module = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the module pkg.sub when there is one.
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in MODULE_PATHS else base)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (
                    isinstance(node.func, ast.Name)
                    and node.func.id in ("import_module", "__import__")
                )
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        found.extend(Import(module, t, path, node.lineno) for t in targets if t)
    return found


ALL_IMPORTS: list[Import] = [i for p in MODULE_PATHS.values() for i in imports_of(p)]


def layer_of(module: str) -> str | None:
    """The layer of a project module (`memcity_pipeline.search.bm25` -> `search`)."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def broken_rule(imp: Import) -> str | None:
    """Why this import breaks the layout, or None when it is allowed."""
    source = layer_of(imp.module)
    top = imp.target.split(".")[0]
    if source is None:
        if imp.module == PACKAGE:
            return None if top != PACKAGE else "the package root imports nothing of the project"
        return f"module {imp.module} is in no layer (add it to LAYERS)"
    if top != PACKAGE:
        if source in DOMAIN and (top == "dagster" or top.startswith("dagster_")):
            return f"domain package {source!r} imports Dagster"
        if source in LEAVES and top not in sys.stdlib_module_names | LEAVES[source]:
            allowed = ", ".join(["the standard library", *sorted(LEAVES[source])])
            return f"{source} imports {top!r}: only {allowed}"
        return None
    target = layer_of(imp.target)
    if target is None:
        return f"imports {imp.target}, which is in no layer"
    if source in LEAVES:
        return f"{source} is a leaf: it imports nothing of the project"
    if target == source:
        return None
    if target == "settings":
        if source in SETTINGS_READERS:
            return None
        return "settings are read only in definitions.py, cli/ and api.py"
    if target == "definitions" and source in DEFINITIONS_USERS:
        return None
    if LAYERS.index(target) < LAYERS.index(source):
        return f"{source!r} imports {target!r}, a layer above it"
    return None


def violations() -> dict[tuple[str, str], list[str]]:
    """(module, imported module) -> `file:line: rule` for every import that breaks a rule."""
    found: dict[tuple[str, str], list[str]] = {}
    for imp in ALL_IMPORTS:
        rule = broken_rule(imp)
        if rule is not None:
            found.setdefault((imp.module, imp.target), []).append(
                f"{imp.where()}: {imp.module} imports {imp.target} ({rule})"
            )
    return found


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_modules_without_note() -> dict[str, int]:
    """Module -> lines, for modules over MAX_LINES whose docstring does not say `stays whole`."""
    found: dict[str, int] = {}
    for name, path in MODULE_PATHS.items():
        lines = line_count(path)
        if lines <= MAX_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if STAYS_WHOLE not in " ".join(docstring.lower().split()):
            found[name] = lines
    return found


def packages_without_docstring() -> list[str]:
    return [
        name
        for name, path in MODULE_PATHS.items()
        if path.name == "__init__.py"
        and not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()
    ]


# ------------------------------------------------------------------------------------- tests


def test_the_parser_sees_the_whole_package() -> None:
    assert f"{PACKAGE}.definitions" in MODULE_PATHS
    assert f"{PACKAGE}.ingestion.sync" in MODULE_PATHS
    assert any(i.target.startswith(f"{PACKAGE}.") for i in ALL_IMPORTS)
    # Function-level imports are found too (the HTML parser imports bs4 lazily).
    assert any(
        i.target == "bs4" and i.module.startswith(f"{PACKAGE}.ingestion") for i in ALL_IMPORTS
    )


def test_every_module_is_in_a_layer() -> None:
    outside = [name for name in MODULE_PATHS if name != PACKAGE and layer_of(name) is None]
    assert not outside, f"modules in no layer of LAYERS: {outside}"


def test_imports_point_down_the_layers() -> None:
    unexpected = {
        edge: lines for edge, lines in violations().items() if edge not in KNOWN_EXCEPTIONS
    }
    assert not unexpected, "imports against the layout:\n" + "\n".join(
        line for lines in unexpected.values() for line in lines
    )


def test_every_package_has_a_docstring() -> None:
    missing = [p for p in packages_without_docstring() if p not in KNOWN_MISSING_DOCSTRINGS]
    assert not missing, f"packages whose __init__.py has no docstring: {missing}"


def test_long_modules_say_why_they_stay_whole() -> None:
    offenders = {
        name: lines
        for name, lines in long_modules_without_note().items()
        if name not in KNOWN_LONG_MODULES
    }
    assert not offenders, (
        f"modules over {MAX_LINES} lines whose docstring does not say why it {STAYS_WHOLE!r} "
        "(split them, or say why not): "
        + ", ".join(
            f"{MODULE_PATHS[n].relative_to(ROOT.parent)} ({k} lines)" for n, k in offenders.items()
        )
    )


def test_known_exceptions_are_still_needed() -> None:
    stale = [f"KNOWN_EXCEPTIONS {e}" for e in KNOWN_EXCEPTIONS if e not in violations()]
    stale += [
        f"KNOWN_LONG_MODULES {m}"
        for m in KNOWN_LONG_MODULES
        if m not in long_modules_without_note()
    ]
    stale += [
        f"KNOWN_MISSING_DOCSTRINGS {p}"
        for p in KNOWN_MISSING_DOCSTRINGS
        if p not in packages_without_docstring()
    ]
    assert not stale, f"fixed, so drop these entries: {stale}"


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("memcity_pipeline.search.bm25", "memcity_pipeline.llm.client", True),
        ("memcity_pipeline.lake.io", "memcity_pipeline.llm.client", False),
        ("memcity_pipeline.llm.client", "dagster", False),
        ("memcity_pipeline.resources.llm", "dagster", True),
        ("memcity_pipeline.resources.llm", "memcity_pipeline.settings", False),
        ("memcity_pipeline.defs.rlm", "memcity_pipeline.settings", False),
        ("memcity_pipeline.defs.rlm", "memcity_pipeline.api", False),
        ("memcity_pipeline.cli.app", "memcity_pipeline.settings", True),
        ("memcity_pipeline.cli.app", "memcity_pipeline.api", True),
        ("memcity_pipeline.api", "memcity_pipeline.cli.app", False),
        ("memcity_pipeline.sandbox.local", "memcity_pipeline.retry", True),
        ("memcity_pipeline.retry", "memcity_pipeline.lake.io", False),
        ("memcity_pipeline.retry", "tenacity", True),
        ("memcity_pipeline.retry", "httpx", False),
        ("memcity_pipeline.enrichment.builders", "memcity_pipeline.progress", True),
        ("memcity_pipeline.progress", "memcity_pipeline.retry", False),
        ("memcity_pipeline.progress", "tenacity", False),
    ],
)
def test_the_rules_themselves(module: str, target: str, allowed: bool) -> None:
    imp = Import(module, target, ROOT / "x.py", 1)
    assert (broken_rule(imp) is None) is allowed
