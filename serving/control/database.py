"""The database that holds every endpoint's state, its workers' statuses and its explanation jobs: an embedded SQLite
file under the Lantern home by default, or the SQLAlchemy URL given as `--state-uri` / `$LANTERN_STATE_URI`
(PostgreSQL, for several hosts serving one endpoint)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from registry.errors import LanternError
from serving.control.errors import StateUnavailable
from serving.environment import STATE_URI_ENV

STATE_FILE = "state.db"
CONNECT_TIMEOUT_S = 3  # a database that does not answer: serving goes on with the state it has, changes get a 503

metadata = MetaData()
endpoint_states = Table(
    "lantern_endpoint_state", metadata,
    Column("endpoint", String(64), primary_key=True),
    Column("revision", Integer, nullable=False),  # compared and set by every change: the one row workers poll
    Column("changed_at", Float, nullable=False),
    Column("document", Text, nullable=False))  # the EndpointState as JSON
worker_statuses = Table(
    "lantern_worker_status", metadata,
    Column("endpoint", String(64), primary_key=True),
    Column("worker", String(200), primary_key=True),  # HOST/PID
    Column("host", String(200), nullable=False),
    Column("heartbeat", Float, nullable=False),
    Column("document", Text, nullable=False))  # the WorkerStatus as JSON
explain_jobs = Table(
    "lantern_explain_job", metadata,
    Column("id", String(64), primary_key=True),  # unguessable (secrets.token_urlsafe)
    Column("endpoint", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # queued, running, succeeded, failed, cancelled
    Column("deployment", String(64), nullable=False),  # fixed when the job is accepted, with its version
    Column("model_version", String(300), nullable=False),
    Column("options", Text, nullable=False),  # the explanation asked for (method, params, targets, answer form) as JSON
    Column("total", Integer, nullable=False),  # images
    Column("batch", Boolean, nullable=False),  # sent as a batch (answered as one), or as one image
    Column("images_done", Integer, nullable=False, default=0),  # explained or failed
    Column("labels_done", Integer, nullable=False, default=0),  # explanations made (one per label)
    Column("labels_total", Integer),  # explanations to make: known once every image's labels are (see `targets`)
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("worker", String(200)),  # HOST/PID running it
    Column("heartbeat", Float),  # its worker's last sign of life: a job whose worker went silent is run again
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text),  # why the job failed as a whole
    Index("lantern_explain_job_queue", "endpoint", "state", "created_at"))
explain_job_images = Table(
    "lantern_explain_job_image", metadata,
    Column("job", String(64), ForeignKey("lantern_explain_job.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("name", String(300), nullable=False),  # the file name sent, or "image N"
    Column("image", LargeBinary),  # the bytes to explain; dropped once the job ends
    Column("state", String(16), nullable=False),  # pending, succeeded, failed
    Column("targets", Text),  # the labels it is explained for (JSON), chosen by its prediction when the job starts
    Column("fidelity", Text),  # the explanation's fidelity report (JSON)
    Column("error", Text))  # {"code", "message"} of an image that could not be explained
explain_job_outputs = Table(
    "lantern_explain_job_output", metadata,
    Column("job", String(64), ForeignKey("lantern_explain_job.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("rank", Integer, primary_key=True),  # the label's place among the image's explained labels
    Column("label", String(200), nullable=False),
    Column("visualization", LargeBinary, nullable=False),  # the 2 x 2 PNG (empty when kept as a file)
    Column("attributions", LargeBinary, nullable=False),  # [3, crop, crop] float32 as a .npy file (empty: a file)
    Column("location", Text))  # where a large image's files are kept (serving/control/job_files.py), else NULL

_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def state_uri(explicit: str | None = None) -> str:
    """`explicit`, else `$LANTERN_STATE_URI`, else the embedded SQLite file `<lantern home>/state.db`."""
    return explicit or os.environ.get(STATE_URI_ENV) or _embedded_uri()


def _embedded_uri() -> str:
    from registry.store import lantern_home  # MLflow is imported with it: not for CLI commands that only talk HTTP

    return f"sqlite:///{lantern_home() / STATE_FILE}"


def shown_uri(uri: str) -> str:
    """`uri` as it may be printed: without its password."""
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return "an invalid URL"


def embedded(uri: str) -> bool:
    """Whether `uri` is this Lantern home's own file (one host, whose keys file is its keys' source)."""
    return uri == _embedded_uri()


def unreachable(uri: str, error: Exception) -> str:
    """What a user is told when the state database at `uri` fails with `error` (the driver's first line)."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"the state database {shown_uri(uri)} does not answer ({text})"


def _sqlite_file(uri: str) -> Path | None:
    url = make_url(uri)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _create_private(path: Path) -> None:
    """The SQLite file (and, through it, its WAL files) readable by its owner only: it holds the keys' digests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        path.chmod(0o600)


def _new_engine(uri: str) -> Engine:
    try:
        url = make_url(uri)
    except ArgumentError:
        raise LanternError(f"the state URI {uri!r} is not a database URL; give e.g. "
                           "postgresql+psycopg://user:password@host/lantern or sqlite:////path/state.db") from None
    sqlite_file = _sqlite_file(uri)
    try:
        if url.get_backend_name() == "sqlite":
            if sqlite_file is not None:
                _create_private(sqlite_file)
            # a connection per use: cheap for a file, and nothing held open across forks or by idle stores
            engine = create_engine(url, connect_args={"timeout": 30}, poolclass=NullPool)

            @event.listens_for(engine, "connect")
            def _wal(connection, _record) -> None:  # noqa: ANN001 - readers never wait for a writer
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()
        else:
            arguments = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
            # no ping before each use (it doubled the transactions): a connection the server dropped fails one read,
            # which invalidates the pool, and the next read reconnects
            engine = create_engine(url, pool_size=2, max_overflow=4, pool_recycle=300,
                                   connect_args=arguments)
    except (NoSuchModuleError, ModuleNotFoundError) as error:
        raise LanternError(f"no driver for the state URI {shown_uri(uri)} ({error}); Lantern ships psycopg for "
                           "postgresql+psycopg:// URLs") from None
    for attempt in range(2):
        try:
            metadata.create_all(engine)
            add_missing_columns(engine)
            break
        except DBAPIError as error:  # another process created the tables (or columns) at the same moment: once more
            if attempt:
                raise StateUnavailable(unreachable(uri, error)) from None
    return engine


def add_missing_columns(engine: Engine) -> None:
    """Bring tables made by an earlier Lantern up to date: each column added since (always nullable) is added to
    them. `create_all` makes missing tables only."""
    existing = inspect(engine)
    tables = set(existing.get_table_names())
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            if table.name not in tables:
                continue
            present = {column["name"] for column in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    assert column.nullable, f"{table.name}.{column.name} was added later, so must be nullable"
                    kind = column.type.compile(dialect=engine.dialect)
                    connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def state_engine(uri: str) -> Engine:
    """One engine (connection pool) per database and process, its tables created on first use; StateUnavailable
    while the database does not answer."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(uri)
        if engine is None:
            try:
                engine = _ENGINES[uri] = _new_engine(uri)
            except SQLAlchemyError as error:
                raise StateUnavailable(unreachable(uri, error)) from None
        return engine


def _forget_engines_in_child() -> None:
    """A forked process opens its own connections (a pool's sockets are the parent's)."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _ENGINES.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)
