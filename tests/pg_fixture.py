"""A small PostgreSQL dataset in the guest's cluster (tests/lab.py): two databases with foreign
keys, a view, a sequence, an identity column, a role of its own, a database name that needs
quoting, and table data that looks like the SQL a restore looks for.

Built fresh (dropped first) by :func:`build`; :class:`PgShop` holds what a restore must bring
back: row counts per ``db.schema.table``, the sequence's value, the view's rows.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests import lab

SHOP = "snapcoord_shop"
AUDIT = "Snapcoord Audit"  # needs quoting everywhere
DATABASES = (SHOP, AUDIT)
ROLE = "snapcoord_app"
#: a table row whose COPY line reads like the statement restore looks for
BAIT = "CREATE DATABASE snapcoord_bait WITH TEMPLATE = template0;"

_SHOP_SQL = f"""
CREATE SCHEMA sales AUTHORIZATION {ROLE};
CREATE TABLE public.customers (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE sales.orders (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  customer_id int NOT NULL REFERENCES public.customers (id),
  total numeric(10, 2) NOT NULL,
  note text
);
CREATE TABLE sales.order_lines (
  order_id bigint NOT NULL REFERENCES sales.orders (id) ON DELETE CASCADE,
  line int NOT NULL,
  sku text NOT NULL,
  PRIMARY KEY (order_id, line)
);
CREATE TABLE public.notes (body text, id int PRIMARY KEY);
CREATE SEQUENCE public.invoice_no START 1000;
CREATE VIEW sales.big_orders AS
  SELECT o.id, c.name, o.total FROM sales.orders o JOIN public.customers c ON c.id = o.customer_id
  WHERE o.total > 900;
INSERT INTO public.customers (name) SELECT 'customer ' || g FROM generate_series(1, 200) g;
INSERT INTO sales.orders (customer_id, total, note)
  SELECT 1 + g % 200, (g * 7) % 1000 + 0.5, CASE WHEN g % 10 = 0 THEN E'tab\\there\\nnewline' END
  FROM generate_series(1, 1000) g;
INSERT INTO sales.order_lines SELECT o.id, l, 'sku-' || l FROM sales.orders o,
  generate_series(1, 3) l;
INSERT INTO public.notes VALUES ('{BAIT}', 1), (E'\\\\.', 2), ('COPY x FROM stdin;', 3);
SELECT nextval('public.invoice_no') FROM generate_series(1, 5);
GRANT SELECT ON ALL TABLES IN SCHEMA sales TO {ROLE};
"""
_AUDIT_SQL = """
CREATE TABLE "Events" (id bigserial PRIMARY KEY, "What" text NOT NULL);
INSERT INTO "Events" ("What") SELECT 'event ' || g FROM generate_series(1, 50) g;
"""


@dataclass(frozen=True)
class PgShop:
    row_counts: dict[str, int]
    invoice_no: int
    big_orders: list[str]

    def current(self) -> PgShop:
        """The same facts, read from the server now."""
        return read()


def read() -> PgShop:
    return PgShop(
        row_counts=lab.pg_row_counts(DATABASES),
        invoice_no=int(lab.psql("SELECT last_value FROM public.invoice_no;", SHOP)[0]),
        big_orders=lab.psql(  # empty when the view is gone
            "SELECT id || ' ' || name || ' ' || total FROM sales.big_orders ORDER BY id;",
            SHOP,
            check=False,
        ),
    )


def build() -> PgShop:
    """(Re)create the dataset; the server must run."""
    lab.pg_drop_databases([*DATABASES, "snapcoord_bait"])
    lab.psql(
        f"DO $$BEGIN CREATE ROLE {ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$;"
    )
    lab.psql(f"CREATE DATABASE {SHOP} OWNER {ROLE};")
    lab.psql(f'CREATE DATABASE "{AUDIT}";')
    lab.psql(_SHOP_SQL, SHOP)
    lab.psql(_AUDIT_SQL, AUDIT)
    return read()


def mutate() -> None:
    """Change what a restore must undo: data, the sequence, the schema."""
    lab.psql(
        "DELETE FROM sales.orders WHERE id % 3 = 0;"
        "SELECT setval('public.invoice_no', 5000);"
        "DROP VIEW sales.big_orders;"
        "ALTER TABLE public.customers ADD COLUMN extra int;"
        "INSERT INTO public.customers (name) VALUES ('late');",
        SHOP,
    )
    lab.psql('DROP TABLE "Events";', AUDIT)


@contextlib.contextmanager
def orders_locked(seconds: float) -> Iterator[None]:
    """Another session holds an exclusive lock on sales.orders for ``seconds`` (pg_dump cannot
    lock it; a COUNT(*) waits for it). Ended by PID on exit."""
    sql = f"BEGIN; LOCK TABLE sales.orders IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({seconds});"
    holder = subprocess.Popen(
        ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-d", SHOP, "-c", sql],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while lab.psql(_HELD, SHOP) != ["1"]:
            if time.monotonic() > deadline:
                raise lab.LabError("the lock on sales.orders was not granted within 30 s")
            time.sleep(0.05)
        yield
    finally:
        holder.terminate()
        holder.wait(timeout=30)


_HELD = (
    "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock'"
    " AND relation = 'sales.orders'::regclass AND granted;"
)
