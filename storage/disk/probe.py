"""Checking the lmdb page index before this process maps it.

lmdb trusts its file: a truncated ``data.mdb`` is mapped past its end and the first touch
of a missing page kills the process with SIGBUS; a damaged page trips an internal assertion
(SIGABRT) or walks off into memory that is not there. None of that can be caught. So the
index is checked first, in a short-lived child process that cannot take the caller down
with it: it runs lmdb's own offline verifier (``lmdb.verify``, pure Python: meta pages, file
size, every page of every tree and of the free list, key order, counters), then opens the
environment read-only, without its lock file, and walks every record, exactly as the store
is about to. The caller maps the index only when the child came back healthy. (The child
runs isolated, ``-I``: nothing from the working directory or PYTHONPATH shadows its
imports; where it cannot import lmdb that way, the verifier runs in this process instead,
which is pure Python and reads the file with plain reads.) A child that
dies, hangs past its timeout or reports a problem means a damaged index
(storage/disk/recover.py rebuilds it from the slab headers).

The child writes nothing: the environment is opened read-only with ``lock=False`` (no
``lock.mdb`` is created or touched), which also lets :func:`check_index` describe a store
that another process has open (storage/disk/inspect.py).
"""

from __future__ import annotations

import enum
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DATA_NAME = "data.mdb"
#: The one named database of the environment (storage/disk/index.py).
DB_NAME = b"pages"

#: The child's exit statuses (anything else, a signal included, means it died).
_OK, _DAMAGED, _NO_LMDB = 0, 3, 4

_CHILD = r"""
import json, sys
try:
    import lmdb
except ImportError:
    sys.exit(4)
path, name = sys.argv[1], sys.argv[2].encode()

def damaged(problem):
    print(json.dumps({"problem": problem}))
    sys.exit(3)

try:
    from lmdb.verify import verify
except ImportError:  # older py-lmdb: the walk below is the whole check
    verify = None
if verify is not None:
    try:
        problems = verify(path, subdir=True)
    except Exception as e:
        problems = [f"{type(e).__name__}: {e}"]
    if problems:
        damaged("; ".join(str(p) for p in problems[:3]))
try:
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=2, subdir=True)
    with env.begin() as txn:
        names = [bytes(k) for k in txn.cursor().iternext(values=False)]
    if names not in ([], [name]):
        damaged(f"unexpected databases {names[:4]!r}")
    entries = 0
    if names:
        db = env.open_db(name, create=False)
        with env.begin(db=db) as txn:
            for key, value in txn.cursor():
                entries += 1
    env.close()
except lmdb.Error as e:
    damaged(f"{type(e).__name__}: {e}")
print(json.dumps({"entries": entries}))
"""


class IndexHealth(enum.Enum):
    OK = "ok"
    #: No index (never created, or creation was cut short before lmdb wrote its file).
    MISSING = "missing"
    DAMAGED = "damaged"
    #: Present but not checked: neither a child process nor lmdb's verifier was available
    #: (lmdb not installed). The store opens it as it would an OK one.
    UNCHECKED = "unchecked"


@dataclass(frozen=True)
class IndexCheck:
    health: IndexHealth
    #: Records in the index (``OK`` only).
    entries: int = 0
    #: What is wrong (``DAMAGED``), or why it was not checked (``UNCHECKED``).
    problem: str = ""
    #: The size of ``data.mdb`` in bytes (0 when missing).
    size: int = 0


def probe_timeout_s(size: int) -> float:
    """Generous: verifying a million-entry index (~160 MB) takes ~1.5 s on the development
    VM. A healthy index mistaken for a hung one only costs a rebuild from the slabs."""
    return 60.0 + size / (4 << 20)


def check_index(index_dir: Path, *, timeout_s: float | None = None) -> IndexCheck:
    """The health of the lmdb environment in ``index_dir``. Reads only; never raises for
    damage (a damaged or unreadable index is ``DAMAGED``)."""
    data = index_dir / DATA_NAME
    try:
        if not index_dir.exists():
            return IndexCheck(IndexHealth.MISSING)
        if not index_dir.is_dir():
            return IndexCheck(IndexHealth.DAMAGED, problem=f"{index_dir} is not a directory")
        if not data.exists():
            return IndexCheck(IndexHealth.MISSING)
        if not data.is_file():
            return IndexCheck(IndexHealth.DAMAGED, problem=f"{data} is not a regular file")
        size = data.stat().st_size
    except OSError as e:
        return IndexCheck(IndexHealth.DAMAGED, problem=f"cannot inspect {data}: {e}")
    if size == 0:
        # lmdb creates the file, then writes its two meta pages: a kill -9 in between
        # leaves it empty. Nothing was ever committed to it.
        return IndexCheck(IndexHealth.MISSING)
    timeout = probe_timeout_s(size) if timeout_s is None else timeout_s
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(index_dir),
                               DB_NAME.decode()],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return IndexCheck(IndexHealth.DAMAGED, size=size,
                          problem=f"checking it took longer than {timeout:.0f} s")
    except OSError as e:
        return _check_here(index_dir, size, f"cannot start {sys.executable!r}: {e}")
    report = _last_json(proc.stdout)
    entries = report.get("entries")
    if proc.returncode == _OK and isinstance(entries, int):
        return IndexCheck(IndexHealth.OK, entries=entries, size=size)
    if proc.returncode == _DAMAGED:
        return IndexCheck(IndexHealth.DAMAGED, problem=str(report.get("problem")), size=size)
    if proc.returncode == _NO_LMDB:
        return _check_here(index_dir, size, f"{sys.executable} cannot import lmdb")
    how = (f"signal {-proc.returncode}" if proc.returncode < 0
           else f"exit status {proc.returncode}")
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    return IndexCheck(IndexHealth.DAMAGED, size=size,
                      problem=f"reading it killed the checking process ({how}) {tail[0]}"
                      .strip())


def _last_json(out: str) -> dict[str, object]:
    for line in reversed(out.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _check_here(index_dir: Path, size: int, why: str) -> IndexCheck:
    """Where no child can run: lmdb's verifier in this process (pure Python: it reads the
    file with plain reads and cannot crash on it), or, without it, trust the file."""
    try:
        from lmdb.verify import verify
    except ImportError:
        log.warning("disk store: cannot check the page index %s before opening it (%s)",
                    index_dir, why)
        return IndexCheck(IndexHealth.UNCHECKED, size=size,
                          problem=f"not checked: {why}, and lmdb is not installed here")
    try:
        problems = verify(str(index_dir), subdir=True)  # type: ignore[no-untyped-call]
    except Exception as e:
        problems = [f"{type(e).__name__}: {e}"]
    if problems:
        return IndexCheck(IndexHealth.DAMAGED, size=size,
                          problem="; ".join(str(p) for p in problems[:3]))
    return IndexCheck(IndexHealth.OK, entries=-1, size=size)
