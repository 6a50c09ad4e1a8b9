"""Node tier: RAM shared by every lmkv process on the host, with no server process.

vLLM runs its scheduler and its model workers in different processes, so the scheduler cannot see a worker's
:class:`~lmkv.storage.memory.MemoryTier`. The node tier keeps objects as files in a tmpfs directory (default
``/dev/shm/lmkv``): any lmkv engine on the host sees and reads what any other one stored. Layout::

    <path>/index.sqlite3      the shared index (SQLite, WAL journal)
    <path>/objects/<h>.obj    published objects, h = BLAKE2b(key); same format as every tier (objects.py)
    <path>/tmp/<owner>.<n>.tmp  writes in progress
    <path>/owners/<owner>     one file per open NodeTier, flock()ed for its lifetime (liveness)

**Why SQLite.** Capacity is host-wide, so whoever writes must agree on what is used, atomically, across
processes that may die at any instruction. SQLite (stdlib ``sqlite3``, a well-kept library) gives exactly that:
a cross-process write lock (``BEGIN IMMEDIATE``), crash-atomic transactions, and readers that never block
writers (WAL). ``synchronous=OFF``: the database lives in the same tmpfs, so there is no disk to sync to; a
process crash still rolls an unfinished transaction back (only an OS crash loses the WAL, and tmpfs with it).
Writers that find the lock held wait (``busy_timeout`` 5 s), then drop the write with a warning.

**How capacity is kept.** The table ``entries`` has a row per object, published (``ready=1``) or being
written (``ready=0``), charged its file size rounded up to 4096 bytes (tmpfs allocates pages); triggers keep
their sum in ``meta.used``. A put reserves before it writes a byte: one transaction evicts least recently used
*published* rows (unlinking their files inside it) until ``used + size <= capacity`` and inserts its own
``ready=0`` row; if it cannot, the put is dropped (``rejected``). Rows are deleted only after their file is
gone, so the index never counts less than the tmpfs holds: capacity is never exceeded, whichever processes
write (an object larger than the capacity is rejected outright). The capacity itself is shared: every opener
records its configured capacity in the index (the last opener wins, with a warning when it changes the value,
and evicts down to it), and every reservation checks against the recorded value.

**Publication, and what a reader can never see.** A write goes to ``tmp/``, then, in one transaction that
checks the reservation still stands, is renamed over ``objects/<h>.obj`` (``os.rename``: atomic) and its row
flips to ``ready=1`` (the row of the version it replaces is deleted in the same transaction). Published files
are never truncated or written again: replacing a key is a rename of a new file over it, so a reader that has
a file open (or mapped) keeps reading one complete object even if it is evicted or replaced meanwhile. A reader
looks the key's row up (its inode number among others), opens the file, and accepts it only when the inode is
the row's, the size is the row's and the header (key included) and payload checksum verify: a temp file, a
half-written, truncated, corrupt or foreign object (a file planted under the key's name, another key's object)
is a miss with a warning, and is removed. The token fingerprint is checked by :class:`~lmkv.storage.TieredStore`.

**Crash recovery.** Every NodeTier holds ``flock(LOCK_EX)`` on its own ``owners/<token>`` file (created
under a temporary name, locked, then renamed into place, so a file in ``owners/`` is always locked by a live
owner or by nobody). The kernel drops the lock when the process dies, even by SIGKILL; flock is per open file
description, so two tiers in one process are two owners as well. The recovery pass runs at open and whenever a
reservation cannot find room: an owner whose file can be locked (or is gone) is dead, and its ``ready=0`` rows,
its temp files and its owner file are deleted (a death between the rename and the commit of a publication
leaves a complete file whose inode no row names: it is deleted too). At open the index is also reconciled with
the directory: rows whose file is missing or is another inode, and object files no row names, are deleted.

**Writes** are accepted at once and written by a background thread (as :class:`~lmkv.storage.disk.DiskTier`):
the caller's ``put`` only queues the object (two SQLite transactions, a checksum pass and the copy into tmpfs
would otherwise be on the request path, and a transaction may wait for another process's); reads in this process
see pending writes (read-your-writes) and ``flush()`` waits for them, writing queued ones on the caller's thread.

**LRU across processes, as far as practical.** Rows are ordered by last access time (``time.time_ns()``, one
clock for the host). A read does not write to the index on the request path: its touch is recorded in memory
and reaches the index in this instance's next write transaction, its ``flush()``/``close()``, or at most
``TOUCH_INTERVAL_S`` (0.1 s) later from the writer thread, carrying the time of the read. Guaranteed: once the
reading instance has flushed (or its writer thread has had 0.1 s), a put through any instance evicts the keys
whose last publication or recorded read is older first; reads not yet recorded do not protect a key.
``policy="fifo"`` records no touches.

**Reads** land in pooled, page-aligned buffers (:class:`~lmkv.storage.buffers.BufferPool`, shared with the
disk and Redis tiers by ``TieredStore.from_config``) with ``preadv``, as the disk tier's, and objects of 8 MiB or
more are hashed piece by piece while a reader thread copies the next piece. Measured against ``mmap`` of the
published file here (/dev/shm, 2-vCPU VM; read + xxh3 verify, medians): 2 MiB: preadv 154 us, mmap+MAP_POPULATE
226 us, mmap with lazy faults 193 us; 32 MiB: preadv 4.4 ms sequential (3.5 ms with the overlapped hash), mmap
3.9-4.0 ms. Building the page tables costs as much as the copy on this machine, and a mapping would have to be
read-only (a consumer writing into it would change every process's object), so consumers that keep a decoded
tensor would pay a copy into fresh memory anyway; a pooled buffer is writable and owned. It also cannot SIGBUS
if something other than lmkv truncates a file while it is read. ``experiments/bench_node.py`` (same machine,
medians, interleaved with raw tmpfs I/O): put (async + flush) 0.93-1.1x of ``writev`` + ``rename`` at 2 and
32 MiB; get 1.0-1.3x of ``readinto`` at 32 MiB (the hash overlaps the copy), 0.6-0.8x at 2 MiB, where the xxh3
pass every tier read makes (and raw ``readinto`` does not) runs after the copy; against ``readinto`` + xxh3 it is
0.75-0.8x (index lookup, open/fstat, buffer handling: ~20 us in a tight loop, more with cold caches).

Limits: the index, its WAL and the owner files live in the same tmpfs and are not counted in the capacity (a
few hundred bytes per object). A NodeTier is not carried across ``fork()`` (SQLite connections are not
fork-safe): in a child its copy misses and skips writes, with a warning; open it in the process that uses it.
Different openers of one path should configure the same capacity (see above).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from lmkv.errors import CorruptObject
from lmkv.storage.base import OneByOne, Queued, TierStats, WarnOnce, log
from lmkv.storage.buffers import BufferPool
from lmkv.storage.disk import ScanEntry, _write_all, read_verified, scan_file
from lmkv.storage.objects import MAX_HEADER, Encoded, ObjectHeader, parse_header
from lmkv.storage.policy import POLICIES

PAGE = 4096
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0
TOUCH_INTERVAL_S = 0.1
_STALE_OWNER_TMP_S = 60.0  # an owner file still under its temporary name this long after creation: a crash
_IN_QUERY = 500  # keys per "key IN (...)" query

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        fname TEXT NOT NULL,     -- objects/<fname>.obj
        size INTEGER NOT NULL,   -- bytes charged: the file size rounded up to whole pages
        atime INTEGER NOT NULL,  -- last access (time_ns) for LRU; publication time for FIFO
        ready INTEGER NOT NULL,  -- 0: being written by owner, 1: published
        owner TEXT NOT NULL,
        ino INTEGER NOT NULL     -- inode of the object's file (created before the reservation)
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS entries_published ON entries(key) WHERE ready = 1",
    "CREATE INDEX IF NOT EXISTS entries_lru ON entries(ready, atime, id)",
    "CREATE INDEX IF NOT EXISTS entries_writing ON entries(owner) WHERE ready = 0",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta VALUES ('used', 0)",
    "INSERT OR IGNORE INTO meta VALUES ('capacity', -1)",
    """CREATE TRIGGER IF NOT EXISTS entries_charge AFTER INSERT ON entries BEGIN
        UPDATE meta SET value = value + NEW.size WHERE name = 'used';
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_refund AFTER DELETE ON entries BEGIN
        UPDATE meta SET value = value - OLD.size WHERE name = 'used';
    END""",
]


def charge(total_len: int) -> int:
    """Bytes an object of ``total_len`` bytes occupies in tmpfs (whole pages; at least one)."""
    return max(PAGE, (total_len + PAGE - 1) // PAGE * PAGE)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


_Job = Queued  # size: the bytes charged


class _NotThatFile(Exception):
    """The key's file is missing or is not the inode its row names (replaced or evicted since the lookup)."""


def _index_reader(root: str) -> sqlite3.Connection | None:
    """A connection to a node directory's index that creates nothing (``mode=rw``: no empty index appears where
    none was); None when there is no index."""
    path = os.path.join(root, "index.sqlite3")
    if not os.path.isfile(path):
        return None
    return sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)


def scan_index(path: str | os.PathLike[str], *, verify: bool = False) -> Iterator[ScanEntry]:
    """Every published object of a node directory, least recently used first, read without opening a NodeTier
    (an opener sets the host-wide capacity and reconciles the directory: a listing must change nothing). Only
    the index is read, no row is written; ``age_s`` is the time since the object's last recorded use."""
    root = os.fspath(path)
    db = _index_reader(root)
    if db is None:
        return
    try:
        rows = db.execute("SELECT key, fname, atime FROM entries WHERE ready = 1 ORDER BY atime, id").fetchall()
    finally:
        db.close()
    now = time.time_ns()
    for key, fname, atime in rows:
        entry = scan_file(os.path.join(root, "objects", fname + ".obj"), key, verify=verify)
        yield entry._replace(age_s=max(0.0, (now - atime) / 1e9))


def index_usage(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(bytes charged, host-wide capacity, published objects)`` of a node directory, from its index alone;
    zeros when there is no index (capacity -1 when no opener recorded one yet)."""
    db = _index_reader(os.fspath(path))
    if db is None:
        return 0, 0, 0
    try:
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        (objects,) = db.execute("SELECT COUNT(*) FROM entries WHERE ready = 1").fetchone()
    finally:
        db.close()
    return int(meta.get("used", 0)), int(meta.get("capacity", -1)), int(objects)


_OPEN: weakref.WeakSet[NodeTier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tier in list(_OPEN):
        tier._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class NodeTier(OneByOne):
    name = "node"
    shared = True  # every lmkv process on the host sees it: the vLLM scheduler looks it up
    # Called as on_removed(key, header or None) for every object this instance evicts, removes or drops as
    # damaged (another process's evictions are not seen): TieredStore.subscribe installs its event hook here.
    on_removed: Callable[[str, ObjectHeader | None], object] | None = None

    def _tell_removed(self, key: str, path: str) -> None:
        """Report ``key``'s removal to ``on_removed`` with the header of its file at ``path`` (read before the
        caller unlinks it; None when unreadable). Nothing is read when no hook is set."""
        if self.on_removed is None:
            return
        try:
            with open(path, "rb", buffering=0) as fh:
                header: ObjectHeader | None = parse_header(fh.read(MAX_HEADER), available=os.fstat(fh.fileno()).st_size)
        except (OSError, CorruptObject):
            header = None
        self.on_removed(key, header)

    def __init__(self, path: str | os.PathLike[str], capacity: int, *, policy: str = "lru",
                 buffer_pool: BufferPool | None = None, read_buffer_bytes: int = 256 << 20) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"path must be a non-empty str or os.PathLike, got {path!r}")
        if isinstance(os.fspath(path), bytes):
            raise ValueError(f"path must be a str or os.PathLike of str, got {path!r}")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be a byte count >= 0, got {capacity!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        if not isinstance(read_buffer_bytes, int) or isinstance(read_buffer_bytes, bool) or read_buffer_bytes < 0:
            raise ValueError(f"read_buffer_bytes must be a byte count >= 0, got {read_buffer_bytes!r}")
        self.path = Path(path)
        self._root = os.fspath(path)
        self._objects = os.path.join(self._root, "objects")
        self._tmpdir = os.path.join(self._root, "tmp")
        self._owners = os.path.join(self._root, "owners")
        self.policy = policy
        self._touching = policy == "lru"
        self._capacity = capacity
        self._configured = capacity
        self._buffers = buffer_pool if buffer_pool is not None else BufferPool(read_buffer_bytes)
        self._warn = WarnOnce()
        self._stats = TierStats()
        self._lock = threading.RLock()  # pending map, touches, stats
        self._wlock = threading.Lock()  # the write connection (one transaction at a time in this process)
        self._rlock = threading.Lock()  # the read connection
        self._pending: dict[str, _Job] = {}
        self._jobs: deque[_Job] = deque()
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._work = threading.Condition(self._lock)
        self._touches: dict[str, int] = {}
        self._tmp_ids = itertools.count()
        self._closed = False
        self.token = secrets.token_hex(8)
        self._owner_fd = -1
        self._db: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        self._open()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="lmkv-node-read")  # read-ahead of large reads
        self._writer = threading.Thread(target=self._worker, name="lmkv-node-writer", daemon=True)
        self._writer.start()
        _OPEN.add(self)

    def _forked(self) -> None:
        """In a child of fork(): the index connections, the writer thread and locks held by other threads did not
        come along, so this copy becomes a tier that misses and skips writes (never a hang on a lock or a flush
        that waits for a thread that is not there). Open a NodeTier in the process that uses it."""
        self._lock = threading.RLock()
        self._wlock, self._rlock = threading.Lock(), threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._work = threading.Condition(self._lock)
        self._pending, self._jobs, self._inflight, self._touches = {}, deque(), 0, {}
        self._db = self._rdb = None  # abandoned, not closed: SQLite connections must not be used across fork
        self._owner_fd = -1  # the parent's lock stays the parent's
        self._closed = True
        self._warn = WarnOnce()
        self._warn("fork", "node tier: %s was opened before fork(); in this child it misses and skips writes "
                   "(open the tier in the process that uses it)", self._root)

    # -- opening, liveness, recovery -------------------------------------------------------------------
    def _open(self) -> None:
        try:
            for d in (self._root, self._objects, self._tmpdir, self._owners):
                os.makedirs(d, exist_ok=True)
        except OSError as exc:  # read-only, permission denied, a path under a file, no inodes
            self._warn("mkdir", "node tier: cannot create %s (%s); reads miss and writes are skipped", self._root, exc)
            return
        db = None
        try:
            self._claim_owner()
            db = self._connect()
            db.execute("PRAGMA journal_mode=WAL")
            with self._txn(db):
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise sqlite3.DatabaseError(f"index schema version {version}, this build uses {SCHEMA_VERSION}")
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._set_capacity(db)
                self._reconcile(db)
            self._db, self._rdb = db, self._connect()
        except (OSError, sqlite3.Error) as exc:
            self._warn("open", "node tier: cannot open the index in %s (%s); reads miss and writes are skipped",
                       self._root, exc)
            if db is not None:
                db.close()
            self._release_owner()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(os.path.join(self._root, "index.sqlite3"), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA synchronous=OFF")
        return db

    @contextmanager
    def _txn(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the host-wide write lock), committed unless it raises."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._wlock:
            if self._db is None:
                raise sqlite3.OperationalError("the node tier is closed")
            with self._txn(self._db) as db:
                self._apply_touches(db)
                yield db

    def _claim_owner(self) -> None:
        tmp = os.path.join(self._owners, f".{self.token}.new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(tmp, os.path.join(self._owners, self.token))  # appears in owners/ already locked
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        self._owner_fd = fd

    def _release_owner(self) -> None:
        if self._owner_fd >= 0:
            _unlink(os.path.join(self._owners, self.token))
            os.close(self._owner_fd)  # drops the lock
            self._owner_fd = -1

    def _alive(self, token: str, cache: dict[str, bool]) -> bool:
        """Whether the owner ``token`` holds its lock; a dead owner's file is removed."""
        if token == self.token:
            return True
        if token in cache:
            return cache[token]
        path = os.path.join(self._owners, token)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            cache[token] = False
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                cache[token] = True
                return True
            _unlink(path)  # we hold a dead owner's lock: nobody else can be using its file
        finally:
            os.close(fd)
        cache[token] = False
        return False

    def _recover(self, db: sqlite3.Connection) -> int:
        """Delete dead owners' reservations and temp files (inside a write transaction); rows deleted."""
        cache: dict[str, bool] = {}
        owners = [o for (o,) in db.execute("SELECT DISTINCT owner FROM entries WHERE ready = 0")]
        dead = [o for o in owners if not self._alive(o, cache)]
        removed = sum(self._drop_reservations(db, owner) for owner in dead)
        try:
            names = os.listdir(self._tmpdir)
        except OSError:
            names = []
        for name in names:  # temp files of dead owners that had no reservation left
            if not self._alive(name.split(".", 1)[0], cache):
                _unlink(os.path.join(self._tmpdir, name))
        if removed:
            self._warn("recovered", "node tier: recovered %d reservations of %d dead writers in %s", removed,
                       len(dead), self._root)
        return removed

    def _drop_reservations(self, db: sqlite3.Connection, owner: str) -> int:
        """Delete the writes in progress of ``owner``, which is dead or done (inside a write transaction): its
        temp files, any file it renamed into place without committing, then its rows; rows deleted."""
        prefix = owner + "."
        try:
            names = [n for n in os.listdir(self._tmpdir) if n.startswith(prefix)]
        except OSError:
            names = []
        for name in names:
            _unlink(os.path.join(self._tmpdir, name))
        removed = 0
        for rid, key, fname, ino in db.execute(
                "SELECT id, key, fname, ino FROM entries WHERE owner = ? AND ready = 0", (owner,)).fetchall():
            final = self._final(fname)
            if _ino(final) == ino:  # it died between the rename and the commit of its publication
                _unlink(final)
                for old, in db.execute("SELECT id FROM entries WHERE key = ? AND ready = 1", (key,)).fetchall():
                    db.execute("DELETE FROM entries WHERE id = ?", (old,))  # its file was replaced
                    removed += 1
            db.execute("DELETE FROM entries WHERE id = ?", (rid,))
            removed += 1
        return removed

    def _reconcile(self, db: sqlite3.Connection) -> None:
        """At open: recovery, stale owner files, rows without their file, files without their row, capacity."""
        self._recover(db)
        cache: dict[str, bool] = {}
        now = time.time()
        for name in os.listdir(self._owners):
            path = os.path.join(self._owners, name)
            if name.startswith("."):  # an owner being created, or one that crashed before its rename
                try:
                    if now - os.stat(path).st_mtime > _STALE_OWNER_TMP_S:
                        _unlink(path)
                except FileNotFoundError:
                    pass
            else:
                self._alive(name, cache)  # removes the files of dead owners
        rows = {fname: (rid, ino, size) for rid, fname, ino, size in
                db.execute("SELECT id, fname, ino, size FROM entries WHERE ready = 1")}
        files: dict[str, os.stat_result] = {}
        for name in os.listdir(self._objects):
            path = os.path.join(self._objects, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            fname = name[:-4] if name.endswith(".obj") else None
            row = rows.get(fname) if fname is not None else None
            if row is None or row[1] != st.st_ino or row[2] != charge(st.st_size):
                self._warn("orphan", "node tier: removing %s: no index entry names this file", path)
                _unlink(path)
            else:
                files[fname] = st
        for fname, (rid, _, _) in rows.items():
            if fname not in files:
                self._warn("missing", "node tier: dropping the index entry of a missing or replaced file %s",
                           self._final(fname))
                db.execute("DELETE FROM entries WHERE id = ?", (rid,))
        self._evict(db, 0)  # the capacity may have shrunk since the last opener

    def _set_capacity(self, db: sqlite3.Connection) -> None:
        old = db.execute("SELECT value FROM meta WHERE name = 'capacity'").fetchone()[0]
        if old >= 0 and old != self._configured:
            self._warn("capacity", "node tier: %s was opened with capacity %d; %d (this opener's) applies to every "
                       "process from now on", self._root, old, self._configured)
        db.execute("UPDATE meta SET value = ? WHERE name = 'capacity'", (self._configured,))

    # -- capacity ----------------------------------------------------------------------------------------
    def _final(self, fname: str) -> str:
        return os.path.join(self._objects, fname + ".obj")

    @staticmethod
    def fname_for(key: str) -> str:
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def file_for(self, key: str) -> Path:
        """The published file of ``key`` (it may not exist)."""
        return Path(self._final(self.fname_for(key)))

    def _shared_capacity(self, db: sqlite3.Connection) -> int:
        cap = db.execute("SELECT value FROM meta WHERE name = 'capacity'").fetchone()[0]
        self._capacity = cap
        return cap

    @staticmethod
    def _used(db: sqlite3.Connection) -> int:
        return db.execute("SELECT value FROM meta WHERE name = 'used'").fetchone()[0]

    def _evict(self, db: sqlite3.Connection, size: int) -> bool:
        """Make room for ``size`` more bytes by evicting published rows, least recently used first; whether it
        fits. Nothing is evicted when even evicting everything evictable would not make room."""
        cap = self._shared_capacity(db)
        need = self._used(db) + size - cap
        if need <= 0:
            return True
        victims, freed = [], 0
        for rid, fname, vsize, vkey in db.execute("SELECT id, fname, size, key FROM entries WHERE ready = 1 "
                                                  "ORDER BY atime, id"):
            victims.append((rid, fname, vkey))
            freed += vsize
            if freed >= need:
                break
        if freed < need:
            return False
        for rid, fname, vkey in victims:
            self._tell_removed(vkey, self._final(fname))
            _unlink(self._final(fname))  # the file first: the index never counts less than the tmpfs holds
            db.execute("DELETE FROM entries WHERE id = ?", (rid,))
        with self._lock:
            self._stats.evictions += len(victims)
        return True

    def _reserve(self, db: sqlite3.Connection, job: _Job, fname: str, ino: int) -> int | None:
        if job.size > self._shared_capacity(db):
            return None
        if not self._evict(db, job.size):
            if not self._recover(db) or not self._evict(db, job.size):  # dead writers may hold the room
                return None
        cur = db.execute("INSERT INTO entries (key, fname, size, atime, ready, owner, ino) "
                         "VALUES (?, ?, ?, ?, 0, ?, ?)", (job.key, fname, job.size, time.time_ns(), self.token, ino))
        return cur.lastrowid

    # -- bookkeeping -------------------------------------------------------------------------------------
    def capacity_bytes(self) -> int:
        return self._capacity

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        """A read on the read connection (never blocked by writers, WAL); [] when the tier is unusable."""
        with self._rlock:
            if self._rdb is None:
                return []
            return self._rdb.execute(sql, args).fetchall()

    def usage_bytes(self) -> int:
        """Bytes charged host-wide: published objects plus every process's writes in progress."""
        try:
            got = self._query("SELECT value FROM meta WHERE name = 'used'")
        except sqlite3.Error as exc:
            self._warn("read", "node tier: index read failed (%s)", exc)
            return 0
        return got[0][0] if got else 0

    def keys(self) -> list[str]:
        """Published keys (every process's) and this instance's pending writes."""
        with self._lock:  # pending first: a write leaves the pending map only after its publication committed
            pending = list(self._pending)
        try:
            published = [k for (k,) in self._query("SELECT key FROM entries WHERE ready = 1 ORDER BY atime, id")]
        except sqlite3.Error as exc:
            self._warn("read", "node tier: index read failed (%s)", exc)
            published = []
        have = set(published)
        return published + [k for k in pending if k not in have]

    def stats(self) -> dict[str, int]:
        try:
            objects = self._query("SELECT COUNT(*) FROM entries WHERE ready = 1")
        except sqlite3.Error:
            objects = []
        usage = self.usage_bytes()
        with self._lock:
            return {**self._stats.as_dict(), "usage_bytes": usage, "objects": objects[0][0] if objects else 0,
                    "pending": len(self._pending), "touches_pending": len(self._touches)}

    def scan(self, *, verify: bool = False) -> Iterator[ScanEntry]:
        """Every published object (this instance's writes flushed first), as :func:`scan_index`."""
        self.flush()
        return scan_index(self._root, verify=verify)

    # -- writes ------------------------------------------------------------------------------------------
    def put(self, key: str, obj: Encoded) -> bool:
        """Queue the write; False (and ``obj`` released) when it is dropped at once. A write may also be dropped
        later, on the writer thread (no room left host-wide, tmpfs full): counted as ``rejected``."""
        size = charge(obj.header.total_len)
        with self._lock:
            ok = not self._closed and self._db is not None and size <= self._capacity
            if not ok:
                self._stats.rejected += 1
            else:
                job = _Job(key, obj, size)
                self._pending[key] = job
                self._inflight += 1
                self._jobs.append(job)
                self._work.notify()
        if not ok:
            if self._db is None or self._closed:
                self._warn("unusable", "node tier: %s is %s; %r not cached", self._root,
                           "closed" if self._closed else "unusable", key)
            else:
                self._warn("full", "node tier: no room for %r (%d bytes, capacity %d); not cached", key, size,
                           self._capacity)
            obj.release()
        return ok

    def _store(self, job: _Job) -> None:
        fname = self.fname_for(job.key)
        final = self._final(fname)
        tmp = os.path.join(self._tmpdir, f"{self.token}.{next(self._tmp_ids)}.tmp")
        fd, rid, ino, published = -1, None, None, False
        try:
            with self._lock:
                if self._pending.get(job.key) is not job:  # removed or replaced before we got to it
                    return
            header = job.obj.header_bytes()  # computes the payload checksum once, off the caller's thread
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            ino = os.fstat(fd).st_ino
            with self._write() as db:
                rid = self._reserve(db, job, fname, ino)
            if rid is None:
                with self._lock:
                    self._stats.rejected += 1
                self._warn("full", "node tier: no room for %r (%d bytes, capacity %d, all of it held); not cached",
                           job.key, job.size, self._capacity)
                return
            _write_all(fd, [header, job.obj.view()])
            os.close(fd)
            fd = -1
            with self._write() as db:
                published = self._publish(db, job, rid, tmp, final)
            if published:
                with self._lock:
                    self._stats.puts += 1
                    self._stats.bytes_written += job.obj.header.total_len
        except Exception as exc:
            kind = "enospc" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else "write"
            self._warn(kind, "node tier: write of %r failed (%s); not cached", job.key, exc)
            with self._lock:
                self._stats.rejected += 1
                self._stats.errors += 1
                self._stats.write_failed += 1
        finally:
            if fd >= 0:
                os.close(fd)
            if not published:
                self._abandon(tmp, rid, final, ino)
            with self._lock:
                if self._pending.get(job.key) is job:
                    del self._pending[job.key]
            # release the source (often a pinned view of the memory tier) before flush can see this write done
            job.drop(self._lock)
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()

    def _publish(self, db: sqlite3.Connection, job: _Job, rid: int, tmp: str, final: str) -> bool:
        row = db.execute("SELECT ready FROM entries WHERE id = ?", (rid,)).fetchone()
        with self._lock:
            current = self._pending.get(job.key) is job  # not removed or replaced in this process meanwhile
        if row is None or row[0] != 0 or not current:
            return False  # the caller cleans up
        os.rename(tmp, final)  # atomic: readers see the old object or this one, never a part
        db.execute("DELETE FROM entries WHERE key = ? AND ready = 1", (job.key,))  # the version just replaced
        db.execute("UPDATE entries SET ready = 1, atime = ? WHERE id = ?", (time.time_ns(), rid))
        return True

    def _abandon(self, tmp: str, rid: int | None, final: str, ino: int | None) -> None:
        """Undo a write that did not publish: its temp file (or its file, renamed before a failed commit), then
        its reservation (in that order: the index never counts less than the tmpfs holds)."""
        try:
            _unlink(tmp)
            if rid is None:
                return
            with self._write() as db:
                if ino is not None and _ino(final) == ino:
                    row = db.execute("SELECT ready FROM entries WHERE id = ?", (rid,)).fetchone()
                    if row is None or row[0] != 1:
                        _unlink(final)
                db.execute("DELETE FROM entries WHERE id = ? AND ready = 0", (rid,))
        except (OSError, sqlite3.Error) as exc:
            self._warn("abandon", "node tier: cannot undo a failed write (%s); the next opener recovers it", exc)

    def _worker(self) -> None:
        while True:
            with self._lock:
                self._work.wait_for(lambda: self._jobs or self._closed, TOUCH_INTERVAL_S)
                job = self._jobs.popleft() if self._jobs else None
                if job is None and self._closed:
                    return
                touches = bool(self._touches)
            if job is not None:
                self._store(job)
            elif touches:
                self._flush_touches()

    def _apply_touches(self, db: sqlite3.Connection) -> None:
        with self._lock:
            if not self._touches:
                return
            touches, self._touches = self._touches, {}
        db.executemany("UPDATE entries SET atime = max(atime, ?) WHERE key = ? AND ready = 1",
                       [(t, k) for k, t in touches.items()])

    def _flush_touches(self) -> None:
        if self._db is None:
            return
        try:
            with self._write():
                pass  # _write applies the recorded touches
        except sqlite3.Error as exc:
            self._warn("touch", "node tier: cannot record reads in the index (%s)", exc)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every accepted write (queued ones are written on the caller's thread: a thread handoff can
        cost milliseconds on a busy machine), then record this instance's reads in the shared index."""
        while True:
            with self._lock:
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    self._idle.wait_for(lambda: self._inflight == 0, timeout)
                    break
            self._store(job)
        if self._touches:
            self._flush_touches()

    # -- reads -------------------------------------------------------------------------------------------
    def _lookup(self, key: str) -> tuple[int, int, int] | None:
        """(row id, inode, bytes charged) of the published object of ``key``."""
        got = self._query("SELECT id, ino, size FROM entries WHERE key = ? AND ready = 1", (key,))
        return got[0] if got else None

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """One index query for the batch (what the vLLM scheduler asks)."""
        keys = list(keys)
        with self._lock:
            found = {k for k in keys if k in self._pending}
        rest = list(dict.fromkeys(k for k in keys if k not in found))
        try:
            for i in range(0, len(rest), _IN_QUERY):
                part = rest[i:i + _IN_QUERY]
                marks = ",".join("?" * len(part))
                found.update(k for (k,) in self._query(
                    f"SELECT key FROM entries WHERE ready = 1 AND key IN ({marks})", part))
        except sqlite3.Error as exc:
            self._warn("read", "node tier: index read failed (%s); treating keys as misses", exc)
        return [k in found for k in keys]

    def get(self, key: str) -> Encoded | None:
        with self._lock:
            job = self._pending.get(key)
            if job is not None:
                self._stats.hits += 1
                self._stats.bytes_read += job.obj.header.total_len
                return job.lease(self._lock)
        obj = None
        try:
            obj = self._get_published(key, self._lookup(key))
        except sqlite3.Error as exc:
            self._warn("read", "node tier: index read failed (%s); treating %r as a miss", exc, key)
        with self._lock:
            self._stats.count_read(obj)
            if obj is not None and self._touching:
                self._touches[key] = time.time_ns()
        return obj

    def _get_published(self, key: str, row: tuple[int, int, int] | None) -> Encoded | None:
        for _ in range(3):
            if row is None:
                return None
            try:
                return self._read(key, row)
            except _NotThatFile:
                again = self._lookup(key)
                if again is not None and again[0] == row[0]:
                    # Same entry, and its file is gone or is another inode: damage, or a publication between its
                    # rename and its commit. The write lock settles which (publishers hold it across both).
                    again = self._confirm_damage(key, row)
                row = again  # evicted (a plain miss) or replaced since the lookup: read the new one
            except (OSError, CorruptObject) as exc:
                self._damaged(key, row, exc)
                return None
        return None

    def _confirm_damage(self, key: str, row: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """Under the write lock: the key's current entry when it changed, else (the entry still names a missing
        or other file) drop it with a warning and None."""
        final = self._final(self.fname_for(key))
        try:
            with self._write() as db:
                cur = db.execute("SELECT id, ino, size FROM entries WHERE key = ? AND ready = 1", (key,)).fetchone()
                if cur is None or cur[0] != row[0] or _ino(final) == row[1]:
                    return cur
        except (OSError, sqlite3.Error) as exc:
            self._warn("read", "node tier: index access failed (%s); treating %r as a miss", exc, key)
            return None
        self._damaged(key, row, "its file is missing or was replaced behind the index's back")
        return None

    def _read(self, key: str, row: tuple[int, int, int]) -> Encoded:
        _, ino, size = row
        try:
            fd = os.open(self._final(self.fname_for(key)), os.O_RDONLY)
        except FileNotFoundError:
            raise _NotThatFile() from None
        try:
            st = os.fstat(fd)
            if st.st_ino != ino:
                raise _NotThatFile()
            actual = st.st_size
            if charge(actual) != size:  # bounds the allocation by the index's figure before trusting the file
                raise CorruptObject(f"file is {actual} bytes, its index entry says {size} (truncated or padded)")
            buf = self._buffers.take(actual)
            try:
                header = read_verified(fd, buf.view, actual, key, self._reader)
            except BaseException:
                buf.release()
                raise
        finally:
            os.close(fd)
        # release recycles the buffer, unless a consumer took the payload to keep it (Encoded.take)
        return Encoded(header, buf.data[header.header_len:actual], owned=True, release=buf.release,
                       on_take=buf.detach)

    def _damaged(self, key: str, row: tuple[int, int, int], reason: object) -> None:
        """A miss with a warning: drop the entry and whatever file sits under the key's name that no entry
        names (a corrupt, truncated, planted or foreign object)."""
        log.warning("node tier: object %r is unreadable or corrupt (%s); treating it as a miss", key, reason)
        with self._lock:
            self._stats.corrupt += 1
        if self.on_removed is not None:
            self.on_removed(key, None)
        final = self._final(self.fname_for(key))
        try:
            with self._write() as db:
                db.execute("DELETE FROM entries WHERE id = ?", (row[0],))
                cur = db.execute("SELECT ino FROM entries WHERE key = ? AND ready = 1", (key,)).fetchone()
                if _ino(final) is not None and (cur is None or cur[0] != _ino(final)):
                    _unlink(final)
        except (OSError, sqlite3.Error) as exc:
            self._warn("unlink", "node tier: cannot drop the damaged object %r (%s)", key, exc)

    # -- removal and lifecycle ---------------------------------------------------------------------------
    def remove(self, key: str) -> bool:
        """Delete the published object (every process stops seeing it) and this instance's pending write."""
        with self._lock:
            found = self._pending.pop(key, None) is not None  # its writer sees it is gone and discards it
            self._touches.pop(key, None)
        if self._db is None:
            return found
        try:
            with self._write() as db:
                for rid, fname in db.execute("SELECT id, fname FROM entries WHERE key = ? AND ready = 1",
                                             (key,)).fetchall():
                    self._tell_removed(key, self._final(fname))
                    _unlink(self._final(fname))
                    db.execute("DELETE FROM entries WHERE id = ?", (rid,))
                    found = True
        except (OSError, sqlite3.Error) as exc:
            self._warn("remove", "node tier: cannot remove %r (%s)", key, exc)
        return found

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
        self.flush()
        with self._lock:
            self._closed = True
            self._work.notify_all()
        self._writer.join(timeout=10)
        self._reader.shutdown(wait=True)
        if self._db is not None:  # records the last reads; drops a reservation a failed undo left behind
            try:
                with self._write() as db:
                    self._drop_reservations(db, self.token)
            except (OSError, sqlite3.Error) as exc:
                self._warn("close", "node tier: cannot update the index on close (%s)", exc)
        with self._wlock, self._rlock:
            for db in (self._db, self._rdb):
                if db is not None:
                    db.close()
            self._db = self._rdb = None
        self._release_owner()

    def __enter__(self) -> NodeTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["NodeTier", "charge"]
