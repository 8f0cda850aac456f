"""Leases: roles only one bot process may hold at a time, elected through the database.

Telegram serves one getUpdates consumer per token (two get 409 Conflict and replay each other's
batches) and Discord one gateway session per token. Every process sharing a database asks
`lease(role, holder, ttl)` now and then: the holder renews its row, anyone else takes the row
only once it has expired, in one atomic statement (an UPSERT whose update is conditional), so
two processes can never both be told True for the same moment. Works alike on SQLite and
PostgreSQL; on PostgreSQL the expiry is measured with the server's clock, shared by all.

A holder must stop acting on its role once `ttl` has passed since it last asked successfully
(measured from before the call), whatever happened meanwhile: then nobody else can have been
granted the role while it still acts.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import case, delete, or_, select

from storage.base import RepositoryBase
from storage.models import Lease, utcnow

__all__ = ["LeaseRecords"]


class LeaseRecords(RepositoryBase):
    """`lease` and `release_lease`: who holds a role, with expiry."""

    async def lease(self, role: str, holder: str, ttl: float) -> bool:
        """Take or renew `role` for `holder` for `ttl` seconds; False while someone else holds it.
        Raises `StorageUnavailable` when the database cannot say (then the caller does not hold it
        past the expiry it knew)."""
        async with self._transaction(write=True) as session:
            insert = self._insert(session, Lease)
            now = self._now(session)
            expires = now + timedelta(seconds=ttl)
            if insert is None:  # another dialect: read, then write (under the write transaction)
                row = await session.get(Lease, role, with_for_update=True)
                if row is None:
                    session.add(Lease(role=role, holder=holder, expires_at=expires, acquired_at=utcnow()))
                    return True
                if row.holder != holder and row.expires_at >= utcnow():
                    return False
                if row.holder != holder:
                    row.acquired_at = utcnow()
                row.holder, row.expires_at = holder, expires
                return True
            statement = insert.values(role=role, holder=holder, expires_at=expires, acquired_at=now)
            statement = statement.on_conflict_do_update(
                index_elements=["role"],
                set_={
                    "holder": holder,
                    "expires_at": expires,
                    "acquired_at": case((Lease.holder == holder, Lease.acquired_at), else_=now),
                },
                where=or_(Lease.holder == holder, Lease.expires_at < now),
            )
            granted = (await session.scalars(statement.returning(Lease.holder))).first()
            return granted == holder

    async def release_lease(self, role: str, holder: str) -> bool:
        """Give `role` up at once if `holder` has it (a clean stop: another may take over now)."""
        async with self._transaction(write=True) as session:
            result = await session.execute(
                delete(Lease).where(Lease.role == role, Lease.holder == holder).execution_options(synchronize_session=False)
            )
            return bool(result.rowcount)

    async def lease_holder(self, role: str) -> str | None:
        """Who holds `role` now (None when nobody does, or the lease has expired)."""
        async with self._transaction(write=False) as session:
            row = await session.scalar(select(Lease).where(Lease.role == role))
            if row is None:
                return None
            now = utcnow()
            if self._dialect(session) == "postgresql":
                now = await session.scalar(select(self._now(session)))
            return row.holder if row.expires_at >= now else None
