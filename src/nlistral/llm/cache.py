"""Persistent store of paid LLM replies (and running batch jobs): one SQLite file, one commit per reply.

Keys are hashes of what was asked (see HttpClient.key): never the API key, never the parser, so a parser fix or a
re-run re-uses paid replies. WAL mode and autocommit make each stored reply survive a `kill -9` right after it.
Every stage on the machine may share the cache (see `cache_location`); `claim` keeps a request in flight from being
sent again by another thread or process at the same time. A cache file that is not a database, or a write that fails
(a full disk), is a ConfigError naming the file and what to do (exit 2), never a traceback.
"""

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from nlistral.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, request TEXT NOT NULL, response TEXT NOT NULL,
                                    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batch_jobs (request_set TEXT PRIMARY KEY, job_id TEXT NOT NULL, created REAL NOT NULL);
"""
CLAIM_PREFIX = 2  # hex digits of a key naming its claim lock: 256 lock files


def cache_location(configured=None) -> Path:
    """`llm_cache_dir` if set, else $NLISTRAL_CACHE_DIR, else the user's cache (~/.cache/nlistral/llm).

    The default is shared by every clone and by queued `dvc exp run`s, whose temporary workspaces would otherwise
    each start with an empty cache and pay again. Sharing is safe: a key covers everything that was asked.
    """
    if configured:
        return Path(configured)
    if os.environ.get("NLISTRAL_CACHE_DIR"):
        return Path(os.environ["NLISTRAL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nlistral" / "llm"


class ReplyCache:
    def __init__(self, cache_dir):
        self.path = path = Path(cache_dir) / "replies.sqlite"
        self._claims = Path(cache_dir) / "claims"
        self._claims.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        with self._storage():
            self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    @contextmanager
    def _storage(self):
        """sqlite3's errors as what to do about them: a file that is not (or no longer) a database, a failed write."""
        try:
            yield
        except sqlite3.OperationalError as err:
            if "locked" in str(err):
                raise
            raise ConfigError(f"{self.path}: cannot write the reply cache ({err}): a full disk or a read-only folder? "
                              "Free space (or point llm_cache_dir / NLISTRAL_CACHE_DIR elsewhere) and re-run; the "
                              "replies stored so far are kept") from None  # fmt: skip
        except sqlite3.DatabaseError as err:
            where = "or point llm_cache_dir / NLISTRAL_CACHE_DIR elsewhere"
            raise ConfigError(f"{self.path}: the reply cache is unreadable ({err}); move it away (a re-run then "
                              f"pays again for its replies) {where}") from None  # fmt: skip

    def claim(self, key: str) -> FileLock:
        """A lock to hold while `key`'s request is in flight, then look in the cache again: threads and processes
        (parallel `dvc exp` workers, two shells) asking for the same reply at once pay for it once. flock locks, so a
        killed holder releases its claim; keys share 256 lock files (two keys meeting on one only wait their turn)."""
        return FileLock(self._claims / f"{key[:CLAIM_PREFIX]}.lock", preserve_lock_file=True)

    def get(self, key: str) -> str | None:
        with self._lock:
            if self._closed:
                return None
            with self._storage():
                row = self._db.execute("SELECT response FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, request: str, response: str) -> None:
        """Store a paid reply; one that arrives after `close` (the stage was stopped) is dropped."""
        with self._lock:
            if self._closed:
                return
            with self._storage():
                self._db.execute(
                    "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)", (key, request, response, time.time())
                )

    def completion_tokens(self, model: str) -> tuple[float, int]:
        """(mean completion tokens, number) of the stored replies of `model`; (0, 0) if there are none."""
        with self._lock:
            mean, count = self._db.execute(
                "SELECT AVG(json_extract(response, '$.usage.completion_tokens')), COUNT(*) FROM replies "
                "WHERE json_extract(request, '$.model') = ? AND json_valid(response)",
                (model,),
            ).fetchone()
        return (mean or 0.0), count

    def batch_job(self, request_set: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT job_id FROM batch_jobs WHERE request_set = ?", (request_set,)).fetchone()
        return row[0] if row else None

    def set_batch_job(self, request_set: str, job_id: str | None) -> None:
        with self._lock:
            if job_id is None:
                self._db.execute("DELETE FROM batch_jobs WHERE request_set = ?", (request_set,))
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO batch_jobs VALUES (?, ?, ?)", (request_set, job_id, time.time())
                )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()
