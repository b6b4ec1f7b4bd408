"""Registry metadata in a SQL database through SQLAlchemy: SQLite by default, PostgreSQL by URL.

Every write runs in one transaction that first locks the single ``registry_state`` row (SQLite:
``BEGIN IMMEDIATE`` takes the database's write lock; PostgreSQL: ``SELECT ... FOR UPDATE``).
Writers are therefore serialised, which is what gives two concurrent publishers distinct version
numbers and keeps the audit chain linear; readers never see half a write. Registry writes are
rare (a publish, an approval, a promotion), so one lock costs nothing that matters.

Rows are returned as plain dataclasses, detached from any session.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from server.registry.audit import GENESIS_HASH, AuditEntry, next_entry
from server.registry.errors import RegistryError
from server.registry.manifest import ModelRef, canonical_json
from server.registry.signing import SigningKey

SCHEMA_VERSION = 1
_PG_SCHEMA_LOCK = 0x66656467  # "fedg": serialises schema creation across processes


def utc_now() -> str:
    """Now, as UTC ISO 8601 with microseconds and a Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Base(DeclarativeBase):
    pass


class StateRow(Base):
    """The one row every writer locks; it also records the audit chain's head."""

    __tablename__ = "registry_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer)
    audit_seq: Mapped[int] = mapped_column(Integer)
    audit_hash: Mapped[str] = mapped_column(String(64))


class ModelRow(Base):
    __tablename__ = "registered_models"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(32))


class VersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), ForeignKey("registered_models.name"))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(32))
    manifest: Mapped[str] = mapped_column(Text)  # canonical JSON
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    signer_key: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(128))
    audit_seq: Mapped[int] = mapped_column(Integer)


class DecisionRow(Base):
    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(16))
    principal: Mapped[str] = mapped_column(String(128))
    public_key: Mapped[str] = mapped_column(String(64))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    comment: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))
    audit_seq: Mapped[int] = mapped_column(Integer)


class AliasRow(Base):
    __tablename__ = "aliases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[str] = mapped_column(String(32))
    audit_seq: Mapped[int] = mapped_column(Integer)


class AuditRow(Base):
    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(128))
    actor: Mapped[str] = mapped_column(String(128))
    actor_key: Mapped[str] = mapped_column(String(64))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))


# ---- detached records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: int
    created_at: str
    manifest: dict[str, Any]
    manifest_json: str  # as stored
    manifest_sha256: str
    signature: str
    signer_key: str
    run_id: str
    audit_seq: int

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class DecisionRecord:
    id: int
    name: str
    version: int
    decision: str
    principal: str
    public_key: str
    manifest_sha256: str
    signature: str
    comment: str
    created_at: str
    audit_seq: int


@dataclass(frozen=True)
class AliasRecord:
    name: str
    alias: str
    version: int
    updated_at: str
    audit_seq: int


def _version(row: VersionRow) -> VersionRecord:
    return VersionRecord(
        row.name,
        row.version,
        row.created_at,
        json.loads(row.manifest),
        row.manifest,
        row.manifest_sha256,
        row.signature,
        row.signer_key,
        row.run_id,
        row.audit_seq,
    )


def _decision(row: DecisionRow) -> DecisionRecord:
    return DecisionRecord(
        row.id,
        row.name,
        row.version,
        row.decision,
        row.principal,
        row.public_key,
        row.manifest_sha256,
        row.signature,
        row.comment,
        row.created_at,
        row.audit_seq,
    )


def _audit(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        row.seq,
        row.at,
        row.action,
        row.subject,
        row.actor,
        row.actor_key,
        json.loads(row.details),
        row.prev_hash,
        row.entry_hash,
        row.signature,
    )


# ---- the store ----------------------------------------------------------------------------------


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


class RegistryStore:
    """The metadata database. Create with a SQLAlchemy URL; the schema is created on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = self._engine(url)
            self._create_schema()
        except (ArgumentError, NoSuchModuleError):
            raise RegistryError(f"--db: '{safe_url(url)}' is not a usable database URL") from None
        except OperationalError as error:
            reason = str(error.orig).strip().splitlines()[0] if error.orig else "unknown error"
            raise RegistryError(
                f"registry database {safe_url(url)}: cannot be opened ({reason})"
            ) from None

    @staticmethod
    def _engine(url: str) -> Engine:
        parsed = make_url(url)
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")  # the driver fedgov installs
        if parsed.get_backend_name() != "sqlite":
            return create_engine(parsed, pool_pre_ping=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:
            # pysqlite's own BEGIN is deferred (no lock until the first write), which lets two
            # writers both read the same head; take the write lock at BEGIN instead.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout = 60000")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def _create_schema(self) -> None:
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            Base.metadata.create_all(connection)
            if connection.execute(select(StateRow.id).where(StateRow.id == 1)).first() is None:
                connection.execute(
                    insert(StateRow).values(
                        id=1, schema_version=SCHEMA_VERSION, audit_seq=0, audit_hash=GENESIS_HASH
                    )
                )

    def close(self) -> None:
        self.engine.dispose()

    # ---- transactions ---------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[WriteTransaction]:
        """A transaction holding the registry's write lock; commits on success."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            state = session.execute(
                select(StateRow).where(StateRow.id == 1).with_for_update()
            ).scalar_one()
            yield WriteTransaction(session, state)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (a consistent snapshot for its duration)."""
        with Session(self.engine) as session, session.begin():
            yield session

    # ---- queries (any session) ------------------------------------------------------------------
    def resolve(self, session: Session, ref: ModelRef) -> VersionRecord:
        """The version ``ref`` names; an unknown model, version or alias raises RegistryError."""
        if session.get(ModelRow, ref.name) is None:
            known = ", ".join(session.scalars(select(ModelRow.name).order_by(ModelRow.name)))
            raise RegistryError(
                f"model '{ref.name}' is not in the registry (models: {known or 'none'})"
            )
        version = ref.version
        if version is None:
            alias = session.get(AliasRow, (ref.name, ref.alias))
            if alias is None:
                aliases = [
                    f"@{a.alias} → {a.version}"
                    for a in session.scalars(select(AliasRow).where(AliasRow.name == ref.name))
                ]
                raise RegistryError(
                    f"{ref}: no version holds alias '{ref.alias}' "
                    f"(aliases of {ref.name}: {', '.join(aliases) or 'none'})"
                )
            version = alias.version
        row = session.scalar(
            select(VersionRow).where(VersionRow.name == ref.name, VersionRow.version == version)
        )
        if row is None:
            latest = session.get(ModelRow, ref.name).latest_version
            raise RegistryError(f"{ref.name}:{version} does not exist (latest is {latest})")
        return _version(row)

    def versions(self, session: Session, name: str | None = None) -> list[VersionRecord]:
        query = select(VersionRow).order_by(VersionRow.name, VersionRow.version)
        if name is not None:
            query = query.where(VersionRow.name == name)
        return [_version(row) for row in session.scalars(query)]

    def aliases(self, session: Session, name: str | None = None) -> list[AliasRecord]:
        query = select(AliasRow).order_by(AliasRow.name, AliasRow.alias)
        if name is not None:
            query = query.where(AliasRow.name == name)
        return [
            AliasRecord(a.name, a.alias, a.version, a.updated_at, a.audit_seq)
            for a in session.scalars(query)
        ]

    def decisions(
        self, session: Session, name: str | None = None, version: int | None = None
    ) -> list[DecisionRecord]:
        query = select(DecisionRow).order_by(DecisionRow.id)
        if name is not None:
            query = query.where(DecisionRow.name == name)
        if version is not None:
            query = query.where(DecisionRow.version == version)
        return [_decision(row) for row in session.scalars(query)]

    def audit_entries(
        self,
        session: Session,
        actions: tuple[str, ...] | None = None,
        subject: str | None = None,
    ) -> list[AuditEntry]:
        """The audit entries in sequence order (only ``actions`` / ``subject`` when given)."""
        query = select(AuditRow).order_by(AuditRow.seq)
        if actions is not None:
            query = query.where(AuditRow.action.in_(actions))
        if subject is not None:
            query = query.where(AuditRow.subject == subject)
        return [_audit(row) for row in session.scalars(query)]

    def audit_head(self, session: Session) -> tuple[int, str]:
        state = session.get(StateRow, 1)
        return state.audit_seq, state.audit_hash


class WriteTransaction:
    """The writes a locked transaction may make; each one appends its audit entry."""

    def __init__(self, session: Session, state: StateRow) -> None:
        self.session = session
        self.state = state

    def audit(
        self, *, action: str, subject: str, actor: str, key: SigningKey, details: dict[str, Any]
    ) -> AuditEntry:
        """Append an entry after the current head, signed with ``key``; move the head."""
        head = (self.state.audit_seq, self.state.audit_hash) if self.state.audit_seq else None
        entry = next_entry(
            head,
            at=utc_now(),
            action=action,
            subject=subject,
            actor=actor,
            key=key,
            details=details,
        )
        self.session.add(
            AuditRow(
                seq=entry.seq,
                at=entry.at,
                action=entry.action,
                subject=entry.subject,
                actor=entry.actor,
                actor_key=entry.actor_key,
                details=canonical_json(entry.details).decode("utf-8"),
                prev_hash=entry.prev_hash,
                entry_hash=entry.entry_hash,
                signature=entry.signature,
            )
        )
        self.state.audit_seq, self.state.audit_hash = entry.seq, entry.entry_hash
        self.session.flush()
        return entry

    def allocate_version(self, name: str) -> int:
        """The next version number of ``name`` (registering the model on its first version)."""
        model = self.session.get(ModelRow, name)
        if model is None:
            model = ModelRow(name=name, latest_version=0, created_at=utc_now())
            self.session.add(model)
        model.latest_version += 1
        self.session.flush()
        return model.latest_version

    def add_version(
        self,
        *,
        name: str,
        version: int,
        manifest: dict[str, Any],
        manifest_sha256: str,
        signature: str,
        signer_key: str,
        run_id: str,
        audit_seq: int,
    ) -> None:
        self.session.add(
            VersionRow(
                name=name,
                version=version,
                created_at=manifest["created_at"],
                manifest=canonical_json(manifest).decode("utf-8"),
                manifest_sha256=manifest_sha256,
                signature=signature,
                signer_key=signer_key,
                run_id=run_id,
                audit_seq=audit_seq,
            )
        )

    def add_decision(
        self,
        *,
        name: str,
        version: int,
        decision: str,
        principal: str,
        public_key: str,
        manifest_sha256: str,
        signature: str,
        comment: str,
        audit_seq: int,
    ) -> None:
        self.session.add(
            DecisionRow(
                name=name,
                version=version,
                decision=decision,
                principal=principal,
                public_key=public_key,
                manifest_sha256=manifest_sha256,
                signature=signature,
                comment=comment,
                created_at=utc_now(),
                audit_seq=audit_seq,
            )
        )

    def set_alias(self, name: str, alias: str, version: int, audit_seq: int) -> int | None:
        """Point ``alias`` of ``name`` at ``version``; return the version it pointed at before."""
        row = self.session.get(AliasRow, (name, alias))
        previous = row.version if row is not None else None
        if row is None:
            row = AliasRow(name=name, alias=alias)
            self.session.add(row)
        row.version, row.updated_at, row.audit_seq = version, utc_now(), audit_seq
        return previous

    def current_alias(self, name: str, alias: str) -> int | None:
        row = self.session.get(AliasRow, (name, alias))
        return row.version if row is not None else None
