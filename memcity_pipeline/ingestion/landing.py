"""The landing folder: where sources arrive, and how they map to orgs, knowledge bases and users.

```
<landing>/orgs/<org>/knowledge_bases/<kb>/<files, any depth>
<landing>/orgs/<org>/users/<user>/memories.jsonl
<landing>/orgs/<org>/users/<user>/conversations/<session>.jsonl
```

Symbolic links are never followed out of the landing folder: a link whose target lies outside it
is reported as a problem and not read. Hidden files and folders (a leading `.`) are ignored.

The scan survives any file system and never opens a file (it only stats). Each of these is a
`LandingProblem` of its own path, reported once, and every other file is still found: a link to a
folder, out of the landing folder, in a loop or dangling; a folder it cannot list (the error of
listing it, e.g. permission denied); a name that is not UTF-8 (its path is shown with the bytes
escaped, `\\xff`, and nothing under such a folder is looked at); a pipe, socket or device; a path
that vanished during the scan. Paths are relative to the landing folder, with `/`, and always
valid UTF-8. A problem in a knowledge base or user folder, or of that folder itself when it is a
folder the scan cannot list or a link to one, belongs to that scope (so the scope stays one, and
its sync keeps what the lake holds there); other paths are in no scope.

Each knowledge base folder and each user folder is one scope (one Dagster partition, keyed
`<org>/<id>`); `landing_scopes` lists them with a fingerprint of their files (paths, sizes,
mtimes), which is how the sensor and `memcity ingest` tell which partitions changed.
"""

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from memcity_pipeline.ingestion.parsing.base import file_kind
from memcity_pipeline.lake.io import check_id
from memcity_pipeline.lake.tables import (
    SCOPE_OF_KIND,
    ScopeKind,
    SourceKind,
    parse_scope_key,
    scope_key,
)

AREAS: dict[str, ScopeKind] = {"knowledge_bases": "knowledge_base", "users": "user"}
_FOLDERS = {scope: area for area, scope in AREAS.items()}


@dataclass(frozen=True)
class SourceFile:
    """One file of the landing folder, placed in the layout."""

    kind: SourceKind
    org_id: str
    scope_id: str  # knowledge base id (documents) or user id (memories, conversations)
    rel_path: str  # relative to the landing root, with `/`
    path: Path  # the file to read (a link inside the landing folder is resolved)
    size: int
    mtime_ns: int

    @property
    def session_id(self) -> str:
        """The conversation session id: the file name without `.jsonl`."""
        return Path(self.rel_path).stem


@dataclass(frozen=True)
class LandingProblem:
    """A path that cannot be ingested for a reason found before reading it."""

    kind: SourceKind | None
    org_id: str | None
    scope_id: str | None
    rel_path: str
    reason: str
    scope_kind: ScopeKind | None = None  # the knowledge base or user folder it lies in, if any
    folder: bool = False  # a folder whose content the scan did not see (unlisted, link, name)

    @property
    def scope(self) -> tuple[ScopeKind, str, str] | None:
        """(scope kind, org, id) of the folder the path lies in; None outside any."""
        if self.scope_kind and self.org_id and self.scope_id:
            return (self.scope_kind, self.org_id, self.scope_id)
        return None


_OUTSIDE = (
    "not in the landing layout (orgs/<org>/knowledge_bases/<kb>/... or orgs/<org>/users/<user>/...)"
)


def _scope_of(parts: tuple[str, ...]) -> tuple[ScopeKind, str, str] | None:
    """The (scope kind, org, id) of the knowledge base or user folder that `parts` are or lie in."""
    if len(parts) < 3 or parts[1] not in AREAS:
        return None
    try:
        check_id("org id", parts[0])
        check_id("id", parts[2])
    except ValueError:
        return None
    return (AREAS[parts[1]], parts[0], parts[2])


def _classify(parts: tuple[str, ...]) -> tuple[SourceKind, str, str] | str:
    """Map a path (parts below `orgs/`) to (kind, org, scope), or return why it does not fit."""
    if len(parts) < 3:
        return _OUTSIDE
    org, area, scope = parts[0], parts[1], parts[2]
    try:
        check_id("org id", org)
        check_id("knowledge base id" if area == "knowledge_bases" else "user id", scope)
    except ValueError as exc:
        return str(exc)
    rest = parts[3:]
    if area == "knowledge_bases" and rest:
        return ("documents", org, scope)
    if area == "users" and rest == ("memories.jsonl",):
        return ("memories", org, scope)
    if area == "users" and len(rest) == 2 and rest[0] == "conversations":
        if not rest[1].endswith(".jsonl"):
            return "a conversation must be a .jsonl file (one file per session)"
        try:
            check_id("session id", rest[1][: -len(".jsonl")])
        except ValueError as exc:
            return str(exc)
        return ("conversations", org, scope)
    return _OUTSIDE


def _problem(
    kind: SourceKind | None, parts: tuple[str, ...], rel: str, reason: str, folder: bool = False
) -> LandingProblem:
    """A refused path, in the scope it lies in (a knowledge base or user folder is in its own)."""
    where = _scope_of(parts) if folder or len(parts) > 3 else None
    if where is None:
        return LandingProblem(kind, None, None, rel, reason, folder=folder)
    return LandingProblem(kind, where[1], where[2], rel, reason, where[0], folder)


def _readable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (held as surrogates by `os`) as `\\xff`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _broken_link(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop: not followed"
    if exc.errno == errno.ENOENT:
        return "dangling symbolic link (its target does not exist)"
    return f"symbolic link not followed: {exc.strerror or exc}"


@dataclass
class _Scan:
    """One walk of the landing folder: the files it found and the paths it refused.

    An entry is named by `parts`, its readable names below `orgs/`. A problem of a knowledge base
    or user folder itself (or of any path in one) belongs to that scope.
    """

    root: Path  # the landing folder, resolved
    files: list[SourceFile] = field(default_factory=list)
    problems: list[LandingProblem] = field(default_factory=list)

    def refuse(self, parts: tuple[str, ...], why: str, *, folder: bool = False) -> None:
        """Refuse a path for `why`; a file outside the layout for that reason instead (a path
        where the layout puts a knowledge base or user folder keeps `why`)."""
        rel = "/".join(("orgs", *parts))
        if folder or (len(parts) == 3 and parts[1] in AREAS):
            self.problems.append(_problem(None, parts, rel, why, folder))
            return
        where = _classify(parts)
        kind = None if isinstance(where, str) else where[0]
        self.problems.append(_problem(kind, parts, rel, where if isinstance(where, str) else why))

    def visit(self, path: Path, parts: tuple[str, ...]) -> bool:
        """Look at one entry: a file is found or refused; True for a folder to walk."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.refuse(parts, "vanished during the scan")
            return False
        except OSError as exc:
            self.refuse(parts, f"cannot stat: {exc.strerror or exc}")
            return False
        is_dir = stat.S_ISDIR(st.st_mode)
        if parts and _readable(path.name) != path.name:
            self.refuse(parts, "name is not valid UTF-8 (rename it): not read", folder=is_dir)
            return False
        if is_dir:
            return True
        target = path
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            try:
                st = os.stat(path)
            except OSError as exc:
                self.refuse(parts, _broken_link(exc))
                return False
            if stat.S_ISDIR(st.st_mode):
                self.refuse(parts, "symbolic link to a folder: not followed", folder=True)
                return False
            if not target.is_relative_to(self.root):
                self.refuse(parts, "symbolic link leading out of the landing folder: not followed")
                return False
        if not stat.S_ISREG(st.st_mode):
            self.refuse(parts, f"not a regular file ({file_kind(st.st_mode)})")
            return False
        where = _classify(parts)
        if isinstance(where, str):
            self.refuse(parts, where)
            return False
        kind, org, scope = where
        rel = "/".join(("orgs", *parts))
        self.files.append(SourceFile(kind, org, scope, rel, target, st.st_size, st.st_mtime_ns))
        return False

    def walk(self, folder: Path, parts: tuple[str, ...]) -> None:
        """Every entry under `folder`, depth first, with a stack (any depth is fine)."""
        stack = [(folder, parts)]
        while stack:
            here, here_parts = stack.pop()
            try:
                names = os.listdir(here)
            except OSError as exc:
                self.refuse(here_parts, f"cannot list folder: {exc.strerror or exc}", folder=True)
                continue
            for name in sorted(names, reverse=True):
                child, child_parts = here / name, (*here_parts, _readable(name))
                if not name.startswith(".") and self.visit(child, child_parts):
                    stack.append((child, child_parts))


def scan_landing(
    root: Path, only: tuple[ScopeKind, str, str] | None = None
) -> tuple[list[SourceFile], list[LandingProblem]]:
    """Every source file under `root/orgs` (or only under one knowledge base's or user's folder,
    `only=(scope kind, org, id)`), sorted by path, and the paths that were refused, sorted by
    path. Never raises for what the file system holds (see the module docstring)."""
    scan = _Scan(Path(os.path.realpath(root)))
    parts: tuple[str, ...] = () if only is None else (only[1], _FOLDERS[only[0]], only[2])
    start = scan.root.joinpath("orgs", *parts)
    try:
        os.lstat(start)
    except FileNotFoundError:
        return [], []
    except OSError:
        pass  # `visit` says why
    if scan.visit(start, parts):
        scan.walk(start, parts)
    files = sorted(scan.files, key=lambda f: f.rel_path)
    return files, sorted(scan.problems, key=lambda p: p.rel_path)


def files_fingerprint(entries: Iterable[tuple[str, int, int]]) -> str:
    """A cheap fingerprint of a set of files: their (path, size, mtime_ns), in any order."""
    digest = hashlib.sha256()
    for path, size, mtime_ns in sorted(entries):
        digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class LandingScopes:
    """The knowledge bases and users of the landing folder, each with its files' fingerprint."""

    knowledge_bases: dict[str, str] = field(default_factory=dict)  # "<org>/<kb>" -> fingerprint
    users: dict[str, str] = field(default_factory=dict)  # "<org>/<user>" -> fingerprint
    unscoped: list[LandingProblem] = field(default_factory=list)  # in no kb or user folder
    unseen: list[str] = field(default_factory=list)  # folders above the scopes the scan missed

    def of(self, scope: ScopeKind) -> dict[str, str]:
        return self.knowledge_bases if scope == "knowledge_base" else self.users

    def hidden(self, scope: ScopeKind, key: str) -> bool:
        """Whether the folder of partition `key` lies in a folder the scan could not look into
        (`orgs/` or an org folder it could not list, say): its partition is not gone, only
        unseen, and must not be removed with its data."""
        org, scope_id = parse_scope_key(key)
        folder = f"orgs/{org}/{_FOLDERS[scope]}/{scope_id}"
        return any(folder == p or folder.startswith(p + "/") for p in self.unseen)


def landing_scopes(root: Path) -> LandingScopes:
    """Every knowledge base and user that has a file (or a refused path) in the landing folder,
    fingerprinted by its files' paths, sizes and mtimes and its refused paths."""
    files, problems = scan_landing(root)
    found = LandingScopes()
    if not root.is_dir():  # an unmounted or mistyped landing folder: nothing is seen as gone
        found.unseen.append("orgs")
    entries: dict[tuple[ScopeKind, str], list[tuple[str, int, int]]] = {}
    for f in files:
        entries.setdefault((SCOPE_OF_KIND[f.kind], scope_key(f.org_id, f.scope_id)), []).append(
            (f.rel_path, f.size, f.mtime_ns)
        )
    for p in problems:  # a refused path is part of its folder's state (its error row)
        if p.scope is None:
            found.unscoped.append(p)
            if p.folder:
                found.unseen.append(p.rel_path)
        else:
            scope, org, scope_id = p.scope
            entries.setdefault((scope, scope_key(org, scope_id)), []).append(
                (f"!{p.rel_path}\0{p.reason}", 0, 0)
            )
    for (scope, key), items in sorted(entries.items()):
        found.of(scope)[key] = files_fingerprint(items)
    return found


@dataclass(frozen=True)
class ScopeChanges:
    """How the landing folder's scopes of one kind compare with the known partitions."""

    added: list[str]  # in the landing folder, not yet a partition
    removed: list[str]  # a partition whose folder is gone
    changed: list[str]  # new, or whose fingerprint differs from the one last seen


def compare_scopes(
    current: dict[str, str], partitions: Iterable[str], seen: dict[str, str]
) -> ScopeChanges:
    """Compare `current` (key -> fingerprint, from `landing_scopes`) with the `partitions` that
    exist and the fingerprints `seen` when they were last requested."""
    known = set(partitions)
    added = sorted(set(current) - known)
    return ScopeChanges(
        added=added,
        removed=sorted(known - set(current)),
        changed=sorted(k for k, fp in current.items() if k in added or seen.get(k) != fp),
    )


def problems_fingerprint(problems: Iterable[LandingProblem]) -> str:
    """A fingerprint of refused paths (to tell when the layout errors changed)."""
    return files_fingerprint((f"{p.rel_path}\0{p.reason}", 0, 0) for p in problems)
