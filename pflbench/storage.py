"""Where a sweep keeps its queue and its record: an Optuna storage chosen from a URL.

- journal file (default, ``<out>/optuna.journal``): one machine, many processes. It has no
  heartbeat, so :func:`reap` fails and re-enqueues the trials whose worker process on this host is
  gone (dead pid, or a pid reused by a younger process).
- PostgreSQL (``postgresql+psycopg://…``): many machines. Heartbeats mark a killed worker's trial
  stale, :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` puts a copy back in the queue,
  ``pool_pre_ping`` drops connections a server restart has broken, and every storage call is
  retried with backoff while the database is unreachable (:class:`RetryingStorage`), so a brief
  outage or a restart does not kill the workers.
- SQLite: one process only. Under parallel workers it reproducibly hands the same enqueued trial
  to two workers, so it is refused for more than one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import optuna
import psutil
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState

T = TypeVar("T")

JOURNAL_NAME = "optuna.journal"
#: A RUNNING trial with no worker recorded this long after it started was claimed by a worker that
#: died before saying who it was; it is failed and re-enqueued like any other dead worker's trial.
ORPHAN_AFTER_S = 120.0


class StorageConfigError(ValueError):
    """A storage URL that cannot be used as asked (unknown scheme, SQLite with many workers)."""


class JournalError(StorageConfigError):
    """A journal file with a damaged line that cannot be repaired without losing history."""


# ---------------------------------------------------------------------------------------------
# The journal file: torn tails repaired, never glued onto
# ---------------------------------------------------------------------------------------------

#: Every record Optuna writes starts like this (``json.dumps`` of ``{"op_code": …, …}``).
_RECORD_START = b'{"op_code":'


def _torn_path(path: str) -> Path:
    return Path(path + ".torn")


def _keep_torn(path: str, data: bytes, why: str) -> None:
    """Append bytes cut from the journal to ``<journal>.torn``, so nothing is thrown away unseen."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with open(_torn_path(path), "ab") as f:
        f.write(f"# {stamp} {why}\n".encode() + data + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _parse(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def repair_journal(path: str | Path, log: Callable[[str], None] | None = None) -> int:
    """Make a journal file readable and safe to append to; returns how many lines were repaired.

    A write cut short (a kill, a full disk) leaves a last line without its newline: Optuna would
    glue the next record onto it and fail on that line for good. Such a tail is cut off and kept
    in ``<journal>.torn``; a line an older pflbench already glued (torn bytes + a whole record) is
    split, keeping the whole record. Any other damaged line cannot be repaired without guessing:
    :class:`JournalError` names the file, the line and the way to recover. Callers hold the
    journal's lock (peers may be appending)."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    fixed = 0
    out: list[bytes] = []
    for i, line in enumerate(lines, start=1):
        if _parse(line):
            out.append(line)
            continue
        cut = line.rfind(_RECORD_START)
        if cut > 0 and _parse(line[cut:]):
            _keep_torn(path, line[:cut], f"torn record glued before line {i}")
            out.append(line[cut:])
            fixed += 1
            continue
        raise JournalError(
            f"{path}: line {i} is not a journal record (damaged file); it cannot be repaired "
            f"without losing tuning history. To recover, move it aside (mv {path} {path}.bad) "
            "and run again: finished runs under results/ are kept and skipped, only the tuning "
            "trials are run again"
        )
    if tail:
        if _parse(tail):  # a whole record whose newline was lost
            out.append(tail)
        else:
            _keep_torn(path, tail, "torn last record (write cut short)")
        fixed += 1
    if fixed:
        text = b"".join(line + b"\n" for line in out)
        tmp = f"{path}.repair.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if log is not None:
            log(
                f"{path}: repaired {fixed} torn line(s) (a write cut short); the cut bytes are "
                f"kept in {_torn_path(path)}"
            )
    return fixed


def _torn_tail(path: str) -> bool:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return False
        f.seek(size - 1)
        return f.read(1) != b"\n"


def _journal_backend(path: str, log: Callable[[str], None] | None = None) -> Any:
    """Optuna's journal file backend, made safe against torn writes: the file is repaired when
    opened, a torn tail is cut before each append, and an append that fails midway (a full disk)
    is undone, so the next one never lands on half a record."""
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file

    class SafeJournalFileBackend(JournalFileBackend):
        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in logs).encode()
            with get_lock_file(self._lock):
                if _torn_tail(self._file_path):  # a peer's write was cut short
                    repair_journal(self._file_path, log)
                    self._log_number_offset = {0: 0}
                self._append(text)

        def _append(self, text: bytes) -> None:
            with open(self._file_path, "ab") as f:
                size = f.seek(0, os.SEEK_END)
                try:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    try:  # undo the partial record (a full disk still allows shrinking)
                        f.truncate(size)
                    except OSError:
                        pass
                    raise

    backend = SafeJournalFileBackend(path)
    with get_lock_file(backend._lock):
        repair_journal(path, log)
    return backend


@dataclass(frozen=True)
class StorageConfig:
    """A parsed storage location: a journal file path or an SQLAlchemy URL."""

    kind: Literal["journal", "rdb"]
    url: str
    dialect: str  # "journal", "postgresql", "sqlite", "mysql"

    @property
    def display(self) -> str:
        """The URL without a password, for messages and logs."""
        if self.kind == "journal":
            return self.url
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return self.url.split("@")[-1]

    @property
    def cli_url(self) -> str:
        """What to pass as ``--storage`` to reach the same storage."""
        return f"journal:{self.url}" if self.kind == "journal" else self.url


def resolve_storage(url: str | None, out: str | Path) -> StorageConfig:
    """Parse ``--storage`` / ``PFLBENCH_STORAGE``; nothing given means a journal file in ``out``.

    Accepted: ``journal:PATH`` (or a path ending in ``.journal`` / ``.log``), ``sqlite:///PATH``,
    ``postgresql[+driver]://…``, ``mysql[+driver]://…``.
    """
    if url is None or not url.strip():
        return StorageConfig("journal", str((Path(out) / JOURNAL_NAME).resolve()), "journal")
    url = url.strip()
    if url.startswith("journal:"):
        path = url[len("journal:") :]
        path = path[2:] if path.startswith("//") else path
        if not path:
            raise StorageConfigError(
                "--storage journal: needs a file path, e.g. journal:runs/x.journal"
            )
        return StorageConfig("journal", str(Path(path).expanduser().resolve()), "journal")
    if "://" not in url:
        if url.endswith((".journal", ".log")):
            return StorageConfig("journal", str(Path(url).expanduser().resolve()), "journal")
        raise StorageConfigError(
            f"--storage {url!r}: not a storage URL; use journal:PATH, sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        )
    scheme = url.split("://", 1)[0].lower()
    dialect = scheme.split("+", 1)[0]
    if dialect in ("postgresql", "postgres"):
        if dialect == "postgres":  # SQLAlchemy only knows the long name
            url = "postgresql" + url[len("postgres") :]
        if "+" not in scheme:  # psycopg 3 is what the package ships with, not psycopg2
            url = "postgresql+psycopg" + url[len("postgresql") :]
        return StorageConfig("rdb", url, "postgresql")
    if dialect in ("sqlite", "mysql"):
        return StorageConfig("rdb", url, dialect)
    raise StorageConfigError(
        f"--storage: unsupported scheme {scheme!r}; use journal:PATH (one machine) or "
        "postgresql+psycopg://… (many machines)"
    )


def check_workers(config: StorageConfig, workers: int, joining: bool = False) -> None:
    """Refuse SQLite for more than one worker, saying why and what to use instead."""
    if config.dialect == "sqlite" and (workers > 1 or joining):
        who = f"{workers} workers" if workers > 1 else "a joining worker"
        raise StorageConfigError(
            f"--storage {config.display}: SQLite cannot be shared by {who}: under parallel "
            "workers it hands the same enqueued trial to two of them (a double pop: the run "
            "would be done twice and the queue miscounted). Use the default journal file (one "
            "machine, any number of processes) or PostgreSQL (many machines); SQLite is fine "
            "for `pflbench run --workers 1`."
        )


# ---------------------------------------------------------------------------------------------
# Retry on transient storage errors
# ---------------------------------------------------------------------------------------------


def _refused_login(exc: BaseException) -> bool:
    """A wrong password or unknown user/database: waiting will not fix it."""
    text = str(exc)
    return any(
        s in text
        for s in ("password authentication failed", "does not exist", "no password supplied")
    )


def is_transient(exc: BaseException) -> bool:
    """A lost or refused database connection (worth retrying), not a bad request nor a refused
    login (a wrong password is reported at once, not retried for minutes like an outage)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        mod = type(e).__module__
        if mod.startswith("sqlalchemy"):
            from sqlalchemy import exc as sa_exc

            if _refused_login(e):
                return False
            if isinstance(
                e, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)
            ):
                return True
            if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
                return True
            if isinstance(e, sa_exc.TimeoutError):  # connection pool exhausted
                return True
        if mod.startswith("psycopg"):
            import psycopg

            if _refused_login(e):
                return False
            if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
                return True
        e = e.__cause__ or e.__context__
    return False


def retry_call(
    fn: Callable[..., T],
    *args: Any,
    timeout_s: float = 300.0,
    first_wait_s: float = 0.5,
    max_wait_s: float = 10.0,
    what: str = "storage",
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> T:
    """Call ``fn``; on a transient error wait (exponential backoff) and retry, up to ``timeout_s``."""
    start = time.monotonic()
    wait = first_wait_s
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            elapsed = time.monotonic() - start
            if not is_transient(exc) or elapsed + wait > timeout_s:
                raise
            attempt += 1
            if attempt in (1, 5) or attempt % 20 == 0:
                (log or _stderr)(
                    f"{what} unreachable ({type(exc).__name__}); retrying in {wait:.1f} s "
                    f"(attempt {attempt}, {elapsed:.0f} s so far)"
                )
            time.sleep(wait)
            wait = min(max_wait_s, wait * 2)


def _stderr(msg: str) -> None:
    print(f"pflbench[{worker_id()}]: {msg}", file=sys.stderr, flush=True)


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Any Optuna storage, with every call retried with backoff while the database is unreachable.

    Optuna's own code (``ask``, ``tell``, ``report``, ``suggest_*``) goes through the storage, so
    wrapping the storage makes all of it survive a database restart, not only pflbench's calls.
    A retried state change that had in fact been committed before the connection broke is
    recognised (the trial is already in the asked state) instead of failing.
    """

    def __init__(self, inner: BaseStorage, timeout_s: float = 300.0) -> None:
        self.inner = inner
        self.timeout_s = timeout_s

    def _r(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return retry_call(fn, *args, timeout_s=self.timeout_s, **kwargs)

    # studies --------------------------------------------------------------------------------
    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        return self._r(self.inner.create_new_study, directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._r(self.inner.delete_study, study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._r(self.inner.set_study_user_attr, study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._r(self.inner.set_study_system_attr, study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._r(self.inner.get_study_id_from_name, study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._r(self.inner.get_study_name_from_id, study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._r(self.inner.get_study_directions, study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._r(self.inner.get_study_user_attrs, study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._r(self.inner.get_study_system_attrs, study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._r(self.inner.get_all_studies)

    # trials ---------------------------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._r(self.inner.create_new_trial, study_id, template_trial)

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any
    ) -> None:
        self._r(
            self.inner.set_trial_param, trial_id, param_name, param_value_internal, distribution
        )

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._r(self.inner.get_trial_id_from_study_id_trial_number, study_id, trial_number)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        attempts = [0]

        def call() -> bool:
            attempts[0] += 1
            try:
                return self.inner.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                # A retry of a change that was committed before the connection broke.
                if attempts[0] > 1 and self.inner.get_trial(trial_id).state == state:
                    return True
                raise

        return self._r(call)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._r(self.inner.set_trial_intermediate_value, trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._r(self.inner.set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._r(self.inner.set_trial_system_attr, trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._r(self.inner.get_trial, trial_id)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return self._r(self.inner.get_all_trials, study_id, deepcopy, states)

    def remove_session(self) -> None:
        self.inner.remove_session()

    # heartbeat ------------------------------------------------------------------------------
    def record_heartbeat(self, trial_id: int) -> None:
        assert isinstance(self.inner, BaseHeartbeat)
        self._r(self.inner.record_heartbeat, trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert isinstance(self.inner, BaseHeartbeat)
        return self._r(self.inner._get_stale_trial_ids, study_id)

    def get_heartbeat_interval(self) -> int | None:
        if isinstance(self.inner, BaseHeartbeat):
            return self.inner.get_heartbeat_interval()
        return None

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        if isinstance(self.inner, BaseHeartbeat):
            return self.inner.get_heartbeat_stale_trial_callback()
        return None


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise StorageConfigError(f"{name}={raw!r}: expected a number of seconds") from None


@dataclass(frozen=True)
class StorageOptions:
    """Timing of heartbeats and retries (env: ``PFLBENCH_HEARTBEAT_INTERVAL``,
    ``PFLBENCH_HEARTBEAT_GRACE``, ``PFLBENCH_STORAGE_RETRY_S``)."""

    heartbeat_interval: int = 30
    grace_period: int | None = None  # Optuna's default: 2 × interval
    max_retry: int = 2
    retry_timeout_s: float = 300.0

    @classmethod
    def from_env(cls) -> StorageOptions:
        hb = _env_float("PFLBENCH_HEARTBEAT_INTERVAL", 30)
        grace = _env_float("PFLBENCH_HEARTBEAT_GRACE", None)
        retry = _env_float("PFLBENCH_STORAGE_RETRY_S", 300.0)
        return cls(
            heartbeat_interval=max(1, int(hb or 30)),
            grace_period=None if grace is None else max(1, int(grace)),
            retry_timeout_s=float(retry or 300.0),
        )


def open_storage(config: StorageConfig, options: StorageOptions | None = None) -> RetryingStorage:
    """The Optuna storage behind ``config``, wrapped so transient errors are retried."""
    options = options or StorageOptions.from_env()
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    # pflbench runs its own heartbeat thread around each trial (worker.Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    if config.kind == "journal":
        from optuna.storages import JournalStorage

        Path(config.url).parent.mkdir(parents=True, exist_ok=True)
        inner: BaseStorage = JournalStorage(_journal_backend(config.url, _stderr))
        return RetryingStorage(inner, options.retry_timeout_s)

    def build() -> BaseStorage:
        return optuna.storages.RDBStorage(
            config.url,
            engine_kwargs={"pool_pre_ping": True},
            heartbeat_interval=options.heartbeat_interval,
            grace_period=options.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                max_retry=options.max_retry
            ),
        )

    def build_serialized() -> BaseStorage:
        with _schema_lock(config):
            return _retry_schema_race(build)

    inner = retry_call(build_serialized, timeout_s=options.retry_timeout_s, what=config.display)
    return RetryingStorage(inner, options.retry_timeout_s)


#: Key of the PostgreSQL advisory lock held while Optuna creates or checks its tables.
_SCHEMA_LOCK_KEY = 0x7066_6C62  # "pflb"


class _schema_lock:
    """Workers starting together on a fresh PostgreSQL database would each create Optuna's
    tables and all but one fail (``UniqueViolation … pg_type_typname_nsp_index``, the race known
    upstream): an advisory lock makes them take turns. Other dialects need none."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.conn: Any = None

    def __enter__(self) -> None:
        if self.config.dialect != "postgresql":
            return
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self.engine = sqlalchemy.create_engine(self.config.url, poolclass=NullPool)
        self.conn = self.engine.connect()
        self.conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})

    def __exit__(self, *exc: object) -> None:
        if self.conn is None:
            return
        import sqlalchemy

        try:
            self.conn.execute(
                sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY}
            )
        except Exception:
            pass  # closing the session releases it as well
        finally:
            self.conn.close()
            self.engine.dispose()


def is_schema_race(exc: BaseException) -> bool:
    """The error a concurrent ``CREATE TABLE`` of the same table raises in PostgreSQL."""
    text = f"{type(exc).__name__}: {exc}"
    if "DuplicateTable" in text:
        return True
    return "UniqueViolation" in text and (
        "pg_type_typname_nsp_index" in text or "already exists" in text
    )


def _retry_schema_race(build: Callable[[], T], attempts: int = 5) -> T:
    """Retry ``build`` on the schema-creation race (a peer without the lock, e.g. an older
    pflbench or optuna-dashboard creating the tables); the second try finds them made."""
    for i in range(attempts):
        try:
            return build()
        except Exception as exc:
            if i == attempts - 1 or not is_schema_race(exc):
                raise
            time.sleep(0.2 * (i + 1))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Worker identity and the reaper
# ---------------------------------------------------------------------------------------------


def worker_id() -> str:
    """``host:pid`` of this process, recorded on every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_started(pid: int | None = None) -> float:
    """Start time of a process (seconds since the epoch): tells a reused pid from the original."""
    return psutil.Process(pid if pid is not None else os.getpid()).create_time()


def worker_alive(worker: str, started: float | None) -> bool | None:
    """Whether the recorded worker still runs; None when it ran on another host (can't tell)."""
    host, _, pid_s = worker.rpartition(":")
    if host != socket.gethostname() or not pid_s.isdigit():
        return None
    try:
        proc = psutil.Process(int(pid_s))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return False  # the pid now belongs to another process
        return True
    except psutil.NoSuchProcess:
        return False


def requeue(study: optuna.Study, trial: FrozenTrial, max_retry: int = 2) -> bool:
    """Put a copy of a failed trial back in the queue (same parameters and cell); False past
    ``max_retry``. The copy's ``failed_trial`` system attribute marks the original as an
    infrastructure failure, which the tuning budget does not count."""
    history = list(trial.system_attrs.get("retry_history", []))
    if len(history) + 1 > max_retry:
        return False
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, _without_worker(trial))
    return True


def _without_worker(trial: FrozenTrial) -> FrozenTrial:
    import copy

    t = copy.deepcopy(trial)
    for key in ("worker", "worker_started"):
        t.user_attrs.pop(key, None)
    return t


def reap(
    study: optuna.Study,
    trials: list[FrozenTrial],
    *,
    pids: bool,
    max_retry: int = 2,
    orphan_after_s: float = ORPHAN_AFTER_S,
    log: Callable[[str], None] | None = None,
) -> int:
    """Fail and re-enqueue RUNNING trials whose worker is gone; returns how many were reaped.

    With ``pids`` (journal storage) a trial whose worker ran on this host and no longer exists is
    reaped. Always, a trial that has no worker recorded ``orphan_after_s`` after it started is
    reaped (its worker died between claiming it and saying who it was). Several reapers may race:
    the storage lets exactly one of them change the state, and only that one re-enqueues.
    """
    now = _dt.datetime.now()
    n = 0
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        worker = t.user_attrs.get("worker")
        if worker is None:
            started = t.datetime_start
            if started is None or (now - started).total_seconds() < orphan_after_s:
                continue
            why = "no worker recorded"
        else:
            if not pids or worker_alive(worker, t.user_attrs.get("worker_started")) is not False:
                continue
            why = f"worker {worker} is gone"
        storage = study._storage
        try:
            claimed = storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        if not claimed:
            continue
        fresh = storage.get_trial(t._trial_id)
        again = requeue(study, fresh, max_retry)
        n += 1
        if log is not None:
            log(
                f"{study.study_name}: trial {t.number} failed ({why}); "
                + ("re-enqueued" if again else f"not re-enqueued (retried {max_retry} times)")
            )
    return n
