"""Incremental ingestion of one knowledge base's or one user's sources into the lake.

For each kind (documents, memories, conversations) the lake holds one Delta table partitioned per
org and scope (`raw_documents`, `memories`, `conversations`), the bookkeeping of the files the
rows came from (`_state/source_files`: path, size, mtime, sha256, status) and the errors found in
them (`ingestion_errors`), both partitioned the same way and told apart by `kind`. One scope is
one Dagster partition; a sync reads and writes only that scope's partitions.

A run for one scope:
1. scans its landing folder; a file whose size and mtime, or else whose sha256, are unchanged
   is not read again;
2. reads each new and changed file once (its sha256 and its rows come from the same bytes) and
   parses it; a bad record is a row of `ingestion_errors` with its line (the first
   `MAX_PROBLEMS_PER_FILE` of a file, then one row counting the others), and the file's other
   records are kept;
3. when a file was added, changed or removed, commits the difference to the scope's partition
   (one MERGE: rows of changed files replaced, rows of deleted files removed); a scope whose
   files are all gone loses its rows;
4. commits the scope's errors and bookkeeping only when they changed, so a rerun on unchanged
   files commits nothing.

Bad input is a row, never a loss. A file that gives no record at all (unreadable, empty,
undecodable, over a limit, a parser failing on it, every record wrong) keeps the rows the lake
holds from its previous version, and its error says so; so does a path the scan refused (a
folder it could not read, a file become a link loop, a pipe...): what the lake holds under it is
kept. Only a path that is gone from the landing folder loses its rows.

`sync_layout_errors` records the landing paths that lie in no knowledge base or user folder.

This module stays whole: comparing with the manifest, parsing into rows, rewriting the scope's
table and its errors are one pass over one report.
"""

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from memcity_pipeline.ingestion import parsing
from memcity_pipeline.ingestion.landing import (
    LandingProblem,
    SourceFile,
    SourceKind,
    files_fingerprint,
    scan_landing,
)
from memcity_pipeline.lake.delta import delete_rows, read_rows, write_rows
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.reconcile import plan_rows
from memcity_pipeline.lake.tables import (
    INGESTION_ERRORS,
    KINDS_OF_SCOPE,
    LAYOUT_ERRORS,
    SCOPE_OF_KIND,
    SOURCE_FILES,
    SOURCE_SCHEMAS,
    SOURCE_TABLES,
    TABLES,
    ScopeKind,
    Where,
    bookkeeping_where,
    scope_where,
)


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_document_chars: int


@dataclass
class SyncReport:
    """What one run did for one kind of source in one knowledge base or user."""

    kind: SourceKind
    org_id: str = ""
    scope_id: str = ""
    files: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed_files: int = 0  # files with at least one error (whole-file or per line)
    rows: int = 0  # rows in the lake for this kind after the run
    rows_written: int = 0  # rows parsed from new or changed files in this run
    tables_written: list[str] = field(default_factory=list)
    tables_deleted: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # table -> Delta version committed
    errors: list[dict[str, Any]] = field(default_factory=list)  # current errors of this kind
    new_errors: list[dict[str, Any]] = field(default_factory=list)  # found in this run

    @property
    def changed_total(self) -> int:
        """New, edited and deleted files: what "N changed" counts."""
        return self.new + self.changed + self.deleted

    @classmethod
    def combined(cls, kind: SourceKind, reports: list["SyncReport"]) -> "SyncReport":
        """One report adding up the reports of several scopes."""
        total = cls(kind)
        for r in reports:
            for name in ("files", "new", "changed", "unchanged", "deleted", "failed_files"):
                setattr(total, name, getattr(total, name) + getattr(r, name))
            total.rows += r.rows
            total.rows_written += r.rows_written
            total.tables_written += r.tables_written
            total.tables_deleted += r.tables_deleted
            total.versions.update(r.versions)
            total.errors += r.errors
            total.new_errors += r.new_errors
        return total


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _document_id(org: str, kb: str, rel_in_kb: str, key: str) -> str:
    return "doc_" + hashlib.sha256(f"{org}/{kb}/{rel_in_kb}#{key}".encode()).hexdigest()[:24]


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _rows_of(
    records: Iterable[Any],
    make: Callable[[Any], dict[str, Any]],
    problems: list[parsing.Problem],
    unique: tuple[str, Callable[[Any], str]] | None = None,
) -> list[dict[str, Any]]:
    """`make(record)` for each record; a record it fails on (or whose strings are not valid
    UTF-8) is a problem with its line, never a failure of the file. With `unique=(column,
    label)`, a record whose row repeats an earlier row's `column` is a problem too (`label(record)`
    names it)."""
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for record in records:
        try:
            row = make(record)
            for value in row.values():
                if isinstance(value, str):
                    value.encode("utf-8")
        except Exception as exc:
            reason = f"unexpected error: {type(exc).__name__}: {exc}"[:300]
            problems.append(parsing.Problem(reason, record.line))
            continue
        if unique is not None:
            column, label = unique
            if row[column] in seen:
                problems.append(parsing.Problem(f"duplicate {label(record)}: skipped", record.line))
                continue
            seen.add(row[column])
        rows.append(row)
    return rows


def _rows_for_file(
    src: SourceFile, data: bytes, limits: Limits, now: datetime
) -> tuple[list[dict[str, Any]], list[parsing.Problem]]:
    """Parse one file's bytes into table rows. Raises `parsing.FileRejected` when it is unusable."""
    kw: dict[str, Any] = {
        "max_file_bytes": limits.max_file_bytes,
        "max_document_chars": limits.max_document_chars,
        "data": data,
    }
    if src.kind == "documents":
        docs, problems = parsing.parse_document_file(src.path, **kw)
        rel_in_kb = src.rel_path.split("/", 4)[4]

        def document(d: parsing.ParsedDocument) -> dict[str, Any]:
            key = f"id:{d.source_id}" if d.source_id else f"n:{d.ordinal}"
            return {
                "org_id": src.org_id,
                "knowledge_base_id": src.scope_id,
                "document_id": _document_id(src.org_id, src.scope_id, rel_in_kb, key),
                "source_path": src.rel_path,
                "format": d.format,
                "title": d.title,
                "text": d.text,
                "char_count": len(d.text),
                "content_hash": _sha(d.text),
                "metadata": _json(d.metadata),
                "ingested_at": now,
            }

        label = ("document_id", lambda d: f"document id {d.source_id!r}")
        return _rows_of(docs, document, problems, label), problems
    if src.kind == "memories":
        memories, problems = parsing.parse_memories_file(src.path, **kw)

        def memory(m: parsing.MemoryRecord) -> dict[str, Any]:
            return {
                "org_id": src.org_id,
                "user_id": src.scope_id,
                "memory_id": m.id,
                "text": m.text,
                "created_at": m.created_at,
                "metadata": _json(m.metadata),
                "source_path": src.rel_path,
                "line": m.line,
                "content_hash": _sha(m.text),
                "ingested_at": now,
            }

        label = ("memory_id", lambda m: f"memory id {m.id!r}")
        return _rows_of(memories, memory, problems, label), problems
    messages, problems = parsing.parse_conversation_file(src.path, **kw)

    def message(msg: parsing.ConversationMessage) -> dict[str, Any]:
        return {
            "org_id": src.org_id,
            "user_id": src.scope_id,
            "session_id": src.session_id,
            "turn": msg.turn,
            "role": msg.role,
            "content": msg.content,
            "created_at": msg.created_at,
            "source_path": src.rel_path,
            "line": msg.line,
            "content_hash": _sha(f"{msg.role}\0{msg.content}"),
            "ingested_at": now,
        }

    return _rows_of(messages, message, problems), problems


def _error_row(
    kind: SourceKind | None,
    org: str | None,
    scope: str | None,
    path: str,
    line: int | None,
    reason: str,
    content_hash: str | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "org_id": org,
        "scope_id": scope,
        "path": parsing.valid_unicode(path),
        "line": line,
        "reason": parsing.valid_unicode(reason)[:1000],
        "content_hash": content_hash,
        "detected_at": now,
    }


def _frame(rows: Iterable[dict[str, Any]], schema: Any) -> pl.DataFrame:
    import pyarrow as pa

    return pl.from_arrow(pa.Table.from_pylist(list(rows), schema=schema))  # type: ignore[return-value]


@dataclass
class _Changes:
    """The landing files of one kind, compared with the manifest of the last run."""

    manifest: list[dict[str, Any]]  # the new manifest (unchanged entries kept as they were)
    parsed: dict[str, list[dict[str, Any]]]  # rel_path -> rows, of new and edited files
    errors: list[dict[str, Any]]  # problems found in those files
    deleted: set[str]  # paths gone since the last run
    unchanged: set[str]  # paths whose errors (if any) still stand
    held: dict[str, int] = field(default_factory=dict)  # refused by the scan: path -> rows kept

    def held_under(self, path: str) -> int:
        """Rows kept for the refused landing `path` (a file, or every file under a folder)."""
        return sum(n for p, n in self.held.items() if _is_under(p, path))


def _is_under(path: str, other: str) -> bool:
    """Whether `path` is `other` or lies in the folder `other`."""
    return path == other or path.startswith(other + "/")


KEPT = "the previous version is kept"


def _keeping(problems: list[parsing.Problem], rows: int) -> list[parsing.Problem]:
    """The problems of a file that gave no row, saying that its previous `rows` are kept."""
    note = f"{KEPT} ({rows:,} rows)"
    if len(problems) == 1 and problems[0].line is None:
        return [parsing.Problem(f"{problems[0].reason}; {note}", None)]
    return [*problems, parsing.Problem(f"no usable record; {note}", None)]


MAX_PROBLEMS_PER_FILE = 1_000  # error rows listed one by one for a file (a fixed limit)


def _listed(problems: list[parsing.Problem]) -> list[parsing.Problem]:
    """The first `MAX_PROBLEMS_PER_FILE` problems of a file, and one row counting the others."""
    if len(problems) <= MAX_PROBLEMS_PER_FILE:
        return problems
    more = len(problems) - MAX_PROBLEMS_PER_FILE
    note = f"and {more:,} more problems (a file lists its first {MAX_PROBLEMS_PER_FILE:,})"
    return [*problems[:MAX_PROBLEMS_PER_FILE], parsing.Problem(note, None)]


def _stat_key(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        (pl.col("size").cast(pl.String) + ":" + pl.col("mtime_ns").cast(pl.String)).alias("_stat")
    )


def _find_changes(
    kind: SourceKind,
    files: list[SourceFile],
    manifest: pl.DataFrame,
    limits: Limits,
    now: datetime,
    report: SyncReport,
    on_progress: Callable[[str], None] | None,
    refused: list[str],
) -> _Changes:
    """Which files are new, edited, unchanged or deleted; read and parse the new and edited ones.

    A file whose size and mtime match the manifest is unchanged without being read; else the
    sha256 of the bytes read decides, and those same bytes are parsed. A known file that gives
    no row keeps its previous rows. A known file at or under a `refused` landing path (a problem
    of the scan) keeps its rows too: under a folder the scan could not list, with its errors and
    bookkeeping as they were; itself refused (a pipe, a link loop...), its old errors give way to
    the scan's and it is read again once it is a file again. Never raises for a bad file: its
    problems become error rows.
    """
    known = {r["path"]: r for r in manifest.iter_rows(named=True)}
    by_path = {f.rel_path: f for f in files}
    held = {
        path: entry["rows"] or 0
        for path, entry in known.items()
        if path not in by_path and any(_is_under(path, r) for r in refused)
    }
    entries = pl.DataFrame(
        [
            {
                "kind": kind,
                "org_id": f.org_id,
                "scope_id": f.scope_id,
                "path": f.rel_path,
                "size": f.size,
                "mtime_ns": f.mtime_ns,
            }
            for f in files
        ],
        schema={
            "kind": pl.String,
            "org_id": pl.String,
            "scope_id": pl.String,
            "path": pl.String,
            "size": pl.Int64,
            "mtime_ns": pl.Int64,
        },
    )
    plan = plan_rows(_stat_key(entries), _stat_key(manifest), key="path", fingerprint="_stat")
    gone = {"size": -1, "mtime_ns": -1, "content_hash": None}  # read it when it is back
    changes = _Changes(
        manifest=plan.reuse.drop("_stat").to_dicts()
        + [known[p] | gone if p in refused else known[p] for p in sorted(held)],
        parsed={},
        errors=[],
        deleted=set(known) - set(by_path) - set(held),
        unchanged=set(plan.reuse["path"].to_list()),
        held=held,
    )
    report.unchanged = len(changes.unchanged)
    report.deleted = len(changes.deleted)
    changes.unchanged |= {p for p in held if p not in refused}  # their errors stand
    todo = plan.todo.drop("_stat").to_dicts()
    for i, entry in enumerate(todo, start=1):
        src, prev = by_path[entry["path"]], known.get(entry["path"])
        try:
            got: parsing.FileBytes | None = parsing.read_file_checked(
                src.path, max_file_bytes=limits.max_file_bytes
            )
            read_error = None
        except parsing.FileRejected as exc:
            got, read_error = None, str(exc)
        digest = hashlib.sha256(got.data).hexdigest() if got else None
        if got:  # the stat of what was read (the scan's may be older)
            entry = {**entry, "size": got.size, "mtime_ns": got.mtime_ns}
        if prev and digest is not None and prev["content_hash"] == digest:  # touched, same bytes
            report.unchanged += 1
            changes.manifest.append({**prev, **entry})
            changes.unchanged.add(src.rel_path)
            continue
        if prev:
            report.changed += 1
        else:
            report.new += 1
        if on_progress:
            on_progress(f"{kind}: parsing {src.rel_path} ({i}/{len(todo)} to read)")
        rows, problems = _parse(src, got.data if got else None, limits, now, read_error)
        problems = _listed(problems)
        kept = 0
        if rows or not problems:
            changes.parsed[src.rel_path] = rows
        else:  # nothing usable: the rows of its previous version stay
            kept = (prev["rows"] or 0) if prev else 0
            if kept:
                problems = _keeping(problems, kept)
        changes.errors += [
            _error_row(kind, src.org_id, src.scope_id, src.rel_path, p.line, p.reason, digest, now)
            for p in problems
        ]
        changes.manifest.append(
            {
                **entry,
                "content_hash": digest,
                "status": "ok" if src.rel_path in changes.parsed else "error",
                "rows": len(rows) or kept,
            }
        )
    return changes


def _parse(
    src: SourceFile, data: bytes | None, limits: Limits, now: datetime, read_error: str | None
) -> tuple[list[dict[str, Any]], list[parsing.Problem]]:
    """A file's rows and problems; a parser bug must not cost the other files."""
    try:
        if data is None:
            raise parsing.FileRejected(read_error or "unreadable file")
        return _rows_for_file(src, data, limits, now)
    except parsing.FileRejected as exc:
        return [], [parsing.Problem(str(exc), None)]
    except Exception as exc:
        return [], [parsing.Problem(f"unexpected error: {type(exc).__name__}: {exc}", None)]


def _rewrite_scope(
    kind: SourceKind, lake: Lake, files: list[SourceFile], changes: _Changes, report: SyncReport
) -> None:
    """Bring the scope's partition of its table in line: its rows minus those of changed or
    deleted files, plus the new rows (one MERGE of the difference); a scope left with no file
    (and none held) loses its rows."""
    name = SOURCE_TABLES[kind]
    where = scope_where(name, report.org_id, report.scope_id)
    label = f"{name}/{report.org_id}/{report.scope_id}"
    if not files and not changes.held:
        if delete_rows(lake, name, where) is not None:
            report.tables_deleted.append(label)
        return
    old = read_rows(lake, name, where)
    damaged = (
        old.select(list(TABLES[name].key)).is_duplicated().any()
    )  # by an earlier version: heal
    if not (changes.parsed or changes.deleted or damaged) and old.height:
        return
    changed_paths = list(set(changes.parsed) | changes.deleted)
    kept = old.filter(~pl.col("source_path").is_in(changed_paths))
    fresh = [row for rows in changes.parsed.values() for row in rows]
    combined = pl.concat([kept, _frame(fresh, SOURCE_SCHEMAS[kind])], how="vertical_relaxed")
    version = write_rows(lake, name, where, combined)
    if version is not None:
        report.tables_written.append(label)
        report.versions[name] = version
    report.rows_written += len(fresh)


def _records_problem(kind: SourceKind, problem: LandingProblem) -> bool:
    """Whether a sync of `kind` records this refused path of its folder (each is recorded once:
    by its kind, and a user folder's path of no kind by `memories`; a path in no scope, such as
    the scope's folder become a dangling link, by `sync_layout_errors`)."""
    if problem.org_id is None or problem.scope_id is None:
        return False
    return problem.kind == kind or (problem.kind is None and kind in ("documents", "memories"))


def sync_sources(
    kind: SourceKind,
    landing: Path,
    lake: Lake | str | Path,
    limits: Limits,
    org_id: str,
    scope_id: str,
    *,
    on_progress: Callable[[str], None] | None = None,
) -> SyncReport:
    """Bring the lake's `kind` table of one knowledge base or user in line with its landing
    folder. Never raises for bad input."""
    lake = Lake.of(lake)
    now = datetime.now(UTC)
    report = SyncReport(kind, org_id, scope_id)
    found, landing_problems = scan_landing(landing, only=(SCOPE_OF_KIND[kind], org_id, scope_id))
    files = [f for f in found if f.kind == kind]
    report.files = len(files)

    bookkeeping = bookkeeping_where(kind, org_id, scope_id)
    manifest = read_rows(lake, "source_files", bookkeeping)
    refused = [p.rel_path for p in landing_problems]
    changes = _find_changes(kind, files, manifest, limits, now, report, on_progress, refused)
    _rewrite_scope(kind, lake, files, changes, report)

    # Errors: keep those of unchanged files, replace those of changed ones.
    old_errors = read_rows(lake, "ingestion_errors", bookkeeping)
    kept = old_errors.filter(pl.col("path").is_in(list(changes.unchanged)))
    error_rows = kept.to_dicts() + changes.errors
    error_rows += [
        # a user folder's path of no kind: memories'
        {**_landing_error(p, now, changes.held_under(p.rel_path)), "kind": kind}
        for p in landing_problems
        if _records_problem(kind, p)
    ]
    _write_errors_if_changed(lake, bookkeeping, old_errors, error_rows)
    report.errors = error_rows
    old_keys = {_error_key(e) for e in old_errors.iter_rows(named=True)}
    report.new_errors = [e for e in error_rows if _error_key(e) not in old_keys]
    report.failed_files = len({e["path"] for e in error_rows})

    new_manifest = sorted(changes.manifest, key=lambda e: e["path"])
    if not new_manifest:
        delete_rows(lake, "source_files", bookkeeping)
    elif changes.parsed or changes.deleted or new_manifest != manifest.sort("path").to_dicts():
        write_rows(lake, "source_files", bookkeeping, _frame(new_manifest, SOURCE_FILES))
    name = SOURCE_TABLES[kind]
    report.rows = read_rows(
        lake, name, scope_where(name, org_id, scope_id), columns=["source_path"]
    ).height
    return report


def scope_is_current(
    landing: Path, lake: Lake | str | Path, scope: ScopeKind, org_id: str, scope_id: str
) -> bool:
    """Whether the lake's bookkeeping of one knowledge base or user matches its landing files
    (same paths, sizes and mtimes; a file held under a path the scan refused is left out): then a
    sync of it would read nothing."""
    files, problems = scan_landing(landing, only=(scope, org_id, scope_id))
    landed = files_fingerprint((f.rel_path, f.size, f.mtime_ns) for f in files)
    found = {f.rel_path for f in files}
    refused = [p.rel_path for p in problems]
    manifests = [
        read_rows(lake, "source_files", bookkeeping_where(kind, org_id, scope_id))
        for kind in KINDS_OF_SCOPE[scope]
    ]
    known = files_fingerprint(
        (r["path"], r["size"], r["mtime_ns"])
        for m in manifests
        for r in m.iter_rows(named=True)
        if r["path"] in found or not any(_is_under(r["path"], p) for p in refused)
    )
    return landed == known


def layout_errors_current(lake: Lake | str | Path, problems: list[LandingProblem]) -> bool:
    """Whether the recorded layout errors are exactly `problems` (paths and reasons)."""
    recorded = read_rows(lake, "ingestion_errors", LAYOUT_ERRORS)
    return sorted(zip(recorded["path"].to_list(), recorded["reason"].to_list(), strict=True)) == (
        sorted((p.rel_path, p.reason) for p in problems)
    )


def sync_layout_errors(lake: Lake | str | Path, problems: list[LandingProblem]) -> int:
    """Record the landing paths that lie in no knowledge base or user folder (rewritten only when
    they changed); how many there are."""
    now = datetime.now(UTC)
    old = read_rows(lake, "ingestion_errors", LAYOUT_ERRORS)
    rows = [{**_landing_error(p, now), "scope_id": None} for p in problems]
    _write_errors_if_changed(Lake.of(lake), LAYOUT_ERRORS, old, rows)
    return len(problems)


def _error_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in ("kind", "org_id", "scope_id", "path", "line", "reason"))


def _landing_error(p: LandingProblem, now: datetime, kept: int = 0) -> dict[str, Any]:
    reason = f"{p.reason}; {KEPT} ({kept:,} rows)" if kept else p.reason
    return _error_row(p.kind, p.org_id, p.scope_id, p.rel_path, None, reason, None, now)


def _write_errors_if_changed(
    lake: Lake, where: Where, old: pl.DataFrame, rows: list[dict[str, Any]]
) -> None:
    """Rewrite the errors table only when its content (ignoring detection times) changed."""

    def keys(frame: pl.DataFrame) -> list[tuple[Any, ...]]:
        return sorted((_error_key(r) for r in frame.iter_rows(named=True)), key=repr)

    new = _frame(rows, INGESTION_ERRORS)
    if keys(new) == keys(old):
        return
    if new.height == 0:
        delete_rows(lake, "ingestion_errors", where)
        return
    write_rows(lake, "ingestion_errors", where, new)
