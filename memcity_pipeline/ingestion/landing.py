"""The landing folder: where sources arrive, and how they map to orgs, knowledge bases and users.

```
<landing>/orgs/<org>/knowledge_bases/<kb>/<files, any depth>
<landing>/orgs/<org>/users/<user>/memories.jsonl
<landing>/orgs/<org>/users/<user>/conversations/<session>.jsonl
```

Symbolic links are never followed out of the landing folder: a link whose target lies outside it
is reported as a problem and not read. Hidden files and folders (a leading `.`) are ignored.
"""

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from memcity_pipeline.lake.io import check_id
from memcity_pipeline.lake.tables import SourceKind


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


def _classify(parts: tuple[str, ...]) -> tuple[SourceKind, str, str] | str:
    """Map a path (parts below `orgs/`) to (kind, org, scope), or return why it does not fit."""
    if len(parts) < 3:
        return "not in the landing layout (orgs/<org>/knowledge_bases/<kb>/... or orgs/<org>/users/<user>/...)"
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
    return "not in the landing layout (orgs/<org>/knowledge_bases/<kb>/... or orgs/<org>/users/<user>/...)"


def scan_landing(root: Path) -> tuple[list[SourceFile], list[LandingProblem]]:
    """Every source file under `root/orgs`, sorted by path, and the paths that were refused."""
    root = root.resolve()
    files: list[SourceFile] = []
    problems: list[LandingProblem] = []
    orgs_dir = root / "orgs"
    if not orgs_dir.is_dir():
        return files, problems
    for dirpath, dirnames, filenames in os.walk(orgs_dir, followlinks=False):
        here = Path(dirpath)
        # Symlinked folders are never entered (os.walk lists them in dirnames without following).
        for name in list(dirnames):
            if name.startswith("."):
                dirnames.remove(name)
            elif (here / name).is_symlink():
                dirnames.remove(name)
                rel = (here / name).relative_to(root).as_posix()
                problems.append(
                    LandingProblem(None, None, None, rel, "symbolic link to a folder: not followed")
                )
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            entry = here / name
            rel = entry.relative_to(root).as_posix()
            where = _classify(entry.relative_to(orgs_dir).parts)
            if isinstance(where, str):
                problems.append(LandingProblem(None, None, None, rel, where))
                continue
            kind, org, scope = where
            target = entry
            if entry.is_symlink():
                resolved = entry.resolve()
                if not resolved.is_relative_to(root):
                    problems.append(
                        LandingProblem(
                            kind,
                            org,
                            scope,
                            rel,
                            "symbolic link leading out of the landing folder: not followed",
                        )
                    )
                    continue
                target = resolved
            try:
                st = target.stat()
            except OSError as exc:
                problems.append(
                    LandingProblem(kind, org, scope, rel, f"cannot stat: {exc.strerror}")
                )
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(LandingProblem(kind, org, scope, rel, "not a regular file"))
                continue
            files.append(SourceFile(kind, org, scope, rel, target, st.st_size, st.st_mtime_ns))
    return files, problems


def landing_fingerprint(root: Path) -> str:
    """A cheap fingerprint of the landing folder (paths, sizes, mtimes) for change detection."""
    files, problems = scan_landing(root)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.rel_path}\0{f.size}\0{f.mtime_ns}\n".encode())
    for p in problems:
        digest.update(f"!{p.rel_path}\0{p.reason}\n".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
