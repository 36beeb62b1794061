"""SQLite store for human pairwise labels: pairs, annotators, left/right assignments and labels.

One file holds everything, so a labelling session can be stopped and restarted at any time:

- ``pairs``: the items to judge (id, prompt, response_a, response_b, meta JSON). Ids default to a
  content hash of (prompt, response_a, response_b), so loading the same file twice adds nothing.
- ``annotators``: a name and an optional group (no other personal data).
- ``assignments``: the left/right order shown to one annotator for one pair. It is drawn at random
  but seeded by (seed, pair id, annotator), and stored, so it is stable across restarts.
- ``labels``: one row per (pair, annotator), ``UNIQUE(pair_id, annotator)``; the annotator's
  left/right/tie/skip answer is stored as a/b/tie/skip using the stored order (``left_is_a``).

Durability: WAL journal with ``synchronous=FULL`` -- every committed label is fsynced to the WAL
before the request returns, so a killed server (or a power cut) loses no saved label.
Thread safety: every call opens its own connection (``busy_timeout`` waits for a writer), so the
web server may call one store from many threads.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.data.annotation_records import (  # noqa: F401  (the store's interface)
    CHOICES,
    MAX_NAME_LENGTH,
    SIDES,
    Assignment,
    DuplicateLabelError,
    InvalidLabelError,
    Label,
    NothingToUndoError,
    OrderMismatchError,
    Pair,
    Progress,
    UnknownPairError,
    check_name,
    content_id,
    order_token,
    seeded_left_is_a,
    side_to_choice,
)
from preftune.errors import PreftuneError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    "group" TEXT,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    pair_id TEXT NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    left_is_a INTEGER NOT NULL CHECK (left_is_a IN (0, 1)),
    created_at TEXT NOT NULL,
    PRIMARY KEY (pair_id, annotator)
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_id TEXT NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    left_is_a INTEGER NOT NULL CHECK (left_is_a IN (0, 1)),
    created_at TEXT NOT NULL,
    UNIQUE (pair_id, annotator)
);
CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels (annotator, id);
"""
_TABLES = frozenset({"settings", "pairs", "annotators", "assignments", "labels"})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# --- the store ----------------------------------------------------------------------------------

class AnnotationStore:
    """All reads and writes of the annotation database (see the module docstring)."""

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0, create: bool = True) -> None:
        """Open (and with ``create``, make) the database at ``path``.

        A file that is not SQLite, or a SQLite database without this store's tables, is refused with a
        PreftuneError and left untouched; ``create=False`` (for readers such as export and stats) also
        refuses a missing or empty file instead of creating the tables.
        """
        self.path = Path(path)
        self.timeout_s = timeout_s
        if self.path.parent and not self.path.parent.exists():
            raise PreftuneError("the folder for the annotation database does not exist",
                                path=str(self.path), hint="create the folder or pick another --db path")
        if self.path.is_dir():
            raise PreftuneError("is a folder, not a preftune annotation database", path=str(self.path))
        if not create and not self.path.exists():
            raise PreftuneError("no annotation database here", path=str(self.path),
                                hint="start one with `preftune annotate serve --pairs FILE --db PATH`")
        try:
            with self._connect() as con:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                missing, others = sorted(_TABLES - tables), tables - {"sqlite_sequence"}
                if missing and (others or not create):
                    what = ("holds no tables" if not others else f"lacks the table {missing[0]!r}"
                            if others & _TABLES else f"has none of the tables {', '.join(sorted(_TABLES))}")
                    raise PreftuneError(f"not a preftune annotation database (a SQLite file that {what})",
                                        path=str(self.path))
                mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise PreftuneError(f"could not switch the database to WAL mode (got {mode})",
                                        path=str(self.path), hint="put the database on a local disk")
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise PreftuneError(f"not a preftune annotation database (SQLite cannot read it: {exc})",
                                path=str(self.path)) from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One connection per call: commit on success, roll back on error, always close."""
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise PreftuneError(f"cannot open the annotation database: {exc}", path=str(self.path)) from exc
        try:
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so checks and writes see one state."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # settings ---------------------------------------------------------------------------------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._write() as con:
            con.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, str(value)))

    def secret(self, key: str = "session_secret") -> str:
        """A random secret kept in the settings (made on first use): the web app signs session tokens
        with it, so the pages a browser holds stay valid across server restarts."""
        with self._write() as con:
            con.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)", (key, secrets.token_hex(32)))
            return con.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()[0]

    @property
    def seed(self) -> int:
        return int(self.get_setting("seed", "0"))

    @property
    def per_pair(self) -> int:
        """K: a pair is offered until it has K labels that are not skips (0 means no limit)."""
        return int(self.get_setting("per_pair", "1"))

    def configure(self, *, per_pair: int | None = None, seed: int | None = None) -> None:
        """Store the settings given (None keeps the stored value or the default)."""
        if per_pair is not None:
            if per_pair < 0:
                raise PreftuneError("--per-pair must be 0 (no limit) or more", field="per_pair")
            self.set_setting("per_pair", per_pair)
        if seed is not None:
            self.set_setting("seed", seed)

    # pairs ------------------------------------------------------------------------------------
    def add_pairs(self, pairs: Iterable[Pair]) -> tuple[int, int]:
        """Insert pairs; a pair whose id is stored with the same content is left alone.

        Returns (added, already present). A known id with different content is an error.
        """
        added = present = 0
        with self._write() as con:
            for p in pairs:
                row = con.execute("SELECT prompt, response_a, response_b FROM pairs WHERE id = ?",
                                  (p.id,)).fetchone()
                if row is None:
                    con.execute("INSERT INTO pairs (id, prompt, response_a, response_b, meta) "
                                "VALUES (?, ?, ?, ?, ?)",
                                (p.id, p.prompt, p.response_a, p.response_b,
                                 json.dumps(p.meta, ensure_ascii=False)))
                    added += 1
                elif tuple(row) == (p.prompt, p.response_a, p.response_b):
                    present += 1
                else:
                    raise PreftuneError(f"pair id {p.id!r} is already stored with different text",
                                        field="id", path=str(self.path),
                                        hint="give the changed pair a new id, or leave ids out "
                                             "(they default to a hash of the text)")
        return added, present

    def get_pair(self, pair_id: str) -> Pair:
        with self._connect() as con:
            row = con.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        if row is None:
            raise UnknownPairError(f"no pair with id {pair_id!r}", field="pair_id")
        return _pair(row)

    def pairs(self) -> list[Pair]:
        with self._connect() as con:
            return [_pair(r) for r in con.execute("SELECT * FROM pairs ORDER BY seq")]

    def count_pairs(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    # annotators -------------------------------------------------------------------------------
    def register_annotator(self, name: str, group: str | None = None) -> str:
        """Add an annotator (or return the existing one); a known name with another group is an error."""
        name = check_name(name)
        group = check_name(group, what="group") if group and group.strip() else None
        with self._write() as con:
            row = con.execute('SELECT "group" FROM annotators WHERE name = ?', (name,)).fetchone()
            if row is None:
                con.execute('INSERT INTO annotators (name, "group", created) VALUES (?, ?, ?)',
                            (name, group, _now()))
            elif group is not None and row["group"] != group:
                raise InvalidLabelError(
                    f"the name {name!r} is already registered in group {row['group']!r}", field="group",
                    hint="use the same group as before, leave the group empty, or pick another name")
        return name

    def annotators(self) -> dict[str, str | None]:
        """Name -> group, in order of registration."""
        with self._connect() as con:
            rows = con.execute('SELECT name, "group" FROM annotators ORDER BY created, name').fetchall()
        return {r["name"]: r["group"] for r in rows}

    # assignment -------------------------------------------------------------------------------
    def _assignment(self, con: sqlite3.Connection, pair_id: str, annotator: str) -> bool:
        """The stored left/right order for (pair, annotator); drawn (seeded) and stored on first use."""
        row = con.execute("SELECT left_is_a FROM assignments WHERE pair_id = ? AND annotator = ?",
                          (pair_id, annotator)).fetchone()
        if row is not None:
            return bool(row["left_is_a"])
        seed_row = con.execute("SELECT value FROM settings WHERE key = 'seed'").fetchone()
        left_is_a = seeded_left_is_a(int(seed_row[0]) if seed_row else 0, pair_id, annotator)
        con.execute("INSERT INTO assignments (pair_id, annotator, left_is_a, created_at) VALUES (?, ?, ?, ?)",
                    (pair_id, annotator, int(left_is_a), _now()))
        return left_is_a

    def assignment(self, pair_id: str, annotator: str) -> Assignment:
        """Show ``pair_id`` to ``annotator``: the pair with its stored left/right order."""
        pair = self.get_pair(pair_id)
        with self._write() as con:
            self._ensure_annotator(con, annotator)
            left_is_a = self._assignment(con, pair_id, annotator)
        return Assignment(pair=pair, annotator=annotator, left_is_a=left_is_a)

    def _open_pair_ids(self, con: sqlite3.Connection, annotator: str) -> list[tuple[int, str]]:
        """(labels that are not skips, pair id) for pairs the annotator has not labelled and that
        have fewer than K such labels."""
        k = int((con.execute("SELECT value FROM settings WHERE key = 'per_pair'").fetchone() or ["1"])[0])
        rows = con.execute(
            "SELECT p.id AS id, COUNT(l.id) AS n FROM pairs p "
            "LEFT JOIN labels l ON l.pair_id = p.id AND l.choice != 'skip' "
            "WHERE p.id NOT IN (SELECT pair_id FROM labels WHERE annotator = ?) "
            "GROUP BY p.id", (annotator,)).fetchall()
        return [(r["n"], r["id"]) for r in rows if k == 0 or r["n"] < k]

    def next_pair(self, annotator: str) -> Assignment | None:
        """The next pair for ``annotator``, or None when nothing is left for them.

        Pairs with the fewest labels come first (coverage before overlap); ties are broken by a
        seeded per-annotator shuffle, so people working at the same time rarely get the same pair.
        """
        annotator = check_name(annotator)
        with self._connect() as con:
            candidates = self._open_pair_ids(con, annotator)
        if not candidates:
            return None
        seed = self.seed

        def key(item: tuple[int, str]) -> tuple[int, str]:
            n, pid = item
            return n, hashlib.sha256(f"{seed}\x00{annotator}\x00{pid}".encode()).hexdigest()

        return self.assignment(min(candidates, key=key)[1], annotator)

    def is_open(self, pair_id: str, annotator: str) -> bool:
        """Whether ``annotator`` has not labelled ``pair_id`` yet."""
        with self._connect() as con:
            row = con.execute("SELECT 1 FROM labels WHERE pair_id = ? AND annotator = ?",
                              (pair_id, annotator)).fetchone()
        return row is None

    def progress(self, annotator: str) -> Progress:
        with self._connect() as con:
            done = con.execute("SELECT COUNT(*) FROM labels WHERE annotator = ?", (annotator,)).fetchone()[0]
            left = len(self._open_pair_ids(con, annotator))
        return Progress(done=done, left=left)

    # labels -----------------------------------------------------------------------------------
    def _ensure_annotator(self, con: sqlite3.Connection, annotator: str) -> None:
        con.execute('INSERT OR IGNORE INTO annotators (name, "group", created) VALUES (?, NULL, ?)',
                    (check_name(annotator), _now()))

    def record(self, *, pair_id: str, annotator: str, side: str, order: str) -> Label:
        """Store one answer: ``side`` in left/right/tie/skip, ``order`` the token the page was shown with.

        Raises UnknownPairError, InvalidLabelError, OrderMismatchError or DuplicateLabelError and then
        changes nothing.
        """
        annotator = check_name(annotator)
        if order not in ("ab", "ba"):
            raise InvalidLabelError(f"unknown order token {order!r}", field="order", hint='expected "ab" or "ba"')
        side_to_choice(side, left_is_a=True)            # validates the answer before touching the db
        pair = self.get_pair(pair_id)
        created = _now()
        with self._write() as con:
            self._ensure_annotator(con, annotator)
            left_is_a = self._assignment(con, pair_id, annotator)
            if order != order_token(left_is_a):
                raise OrderMismatchError(
                    f"order token {order!r} does not match the order shown to {annotator!r} for this pair",
                    field="order", hint="reload the page and answer again")
            choice = side_to_choice(side, left_is_a=left_is_a)
            try:
                con.execute("INSERT INTO labels (pair_id, annotator, choice, left_is_a, created_at) "
                            "VALUES (?, ?, ?, ?, ?)", (pair_id, annotator, choice, int(left_is_a), created))
            except sqlite3.IntegrityError as exc:
                raise DuplicateLabelError(f"{annotator!r} already labelled pair {pair_id!r}",
                                          field="pair_id", hint="use Undo to change the last answer") from exc
            group = con.execute('SELECT "group" FROM annotators WHERE name = ?', (annotator,)).fetchone()[0]
        return Label(pair_id=pair.id, prompt=pair.prompt, response_a=pair.response_a,
                     response_b=pair.response_b, annotator=annotator, group=group, choice=choice,
                     left_is_a=left_is_a, created_at=created)

    def undo(self, annotator: str) -> str:
        """Delete the annotator's most recent label; return its pair id (the assignment is kept)."""
        annotator = check_name(annotator)
        with self._write() as con:
            row = con.execute("SELECT id, pair_id FROM labels WHERE annotator = ? ORDER BY id DESC LIMIT 1",
                              (annotator,)).fetchone()
            if row is None:
                raise NothingToUndoError(f"{annotator!r} has no label to undo")
            con.execute("DELETE FROM labels WHERE id = ?", (row["id"],))
        return row["pair_id"]

    def labels(self) -> list[Label]:
        """Every label, oldest first, with the pair's text and the annotator's group."""
        with self._connect() as con:
            rows = con.execute(
                'SELECT l.pair_id, p.prompt, p.response_a, p.response_b, l.annotator, a."group" AS grp, '
                "l.choice, l.left_is_a, l.created_at FROM labels l "
                "JOIN pairs p ON p.id = l.pair_id JOIN annotators a ON a.name = l.annotator "
                "ORDER BY l.id").fetchall()
        return [Label(pair_id=r["pair_id"], prompt=r["prompt"], response_a=r["response_a"],
                      response_b=r["response_b"], annotator=r["annotator"], group=r["grp"],
                      choice=r["choice"], left_is_a=bool(r["left_is_a"]), created_at=r["created_at"])
                for r in rows]

    def count_labels(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT COUNT(*) FROM labels").fetchone()[0]

    def journal_mode(self) -> str:
        with self._connect() as con:
            return str(con.execute("PRAGMA journal_mode").fetchone()[0])


def _pair(row: sqlite3.Row) -> Pair:
    return Pair(id=row["id"], prompt=row["prompt"], response_a=row["response_a"],
                response_b=row["response_b"], meta=json.loads(row["meta"] or "{}"))
