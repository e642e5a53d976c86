"""The dump benchmarks' fixtures, generated inside a scratch MariaDB (tests/lab/mariadb.py).

* :func:`rows_table`: the "1 M-row fixture" of bench/dump.py since its first version: one
  InnoDB table ``benchdb.isys_obj`` of ROWS rows, about 112 bytes of SQL per row (1 M rows:
  111.5 MB of SQL). One table: a dump split by table has nothing to split here.
* :func:`idoit_large`: the "5 GB fixture": about GIGABYTES of data + index
  (information_schema DATA_LENGTH + INDEX_LENGTH) in the i-doit shape: two databases, a few big
  tables of very different sizes (the logbook about two thirds of the bytes, the objects about
  a sixth, three category tables 3-9 % each) and small ones (object types, tenants, settings),
  foreign keys, a view, a trigger, a function, an event. So a dump split by table has parts of
  unequal size (the logbook alone outweighs everything else), as on a real i-doit.

Rows are made by the server itself (``INSERT … SELECT … FROM seq_1_to_N``, MariaDB's sequence
engine: no SQL text to parse or send), in chunks of 250,000 rows so no transaction grows an
undo log of gigabytes. Text is deterministic and about as compressible as i-doit's (serialised
PHP arrays with hashes in them: gzip -9 about 3-4 to 1, not the 100 to 1 of a repeated letter).
``python3 bench/dumpdata.py --gigabytes 5`` (root; PYTHONPATH=.) builds it in a scratch server
of its own and prints the table sizes and the time it took (minutes on this 2-core machine).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from tests import lab
from tests.lab import sandbox


class SqlServer(Protocol):
    """A scratch server (lab.ScratchMariaDB) or the lab guest's own (bench/dump.py)."""

    @property
    def socket(self) -> Path | str | None: ...

    def sql(self, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]: ...


CHUNK = 250_000
#: what one object costs in data + index on disk, bytes (1,897 at 0.5 GB; 1,834 at 5 GB: 4,826 MB
#: for 2.63 M objects, in 249 s on a loaded 2-core machine)
BYTES_PER_OBJECT = 1_830

LARGE_DATABASES = ("idoit_data", "idoit_system")


def rows_table(server: SqlServer, rows: int) -> None:
    """The 1 M-row fixture (``rows`` = 1,000,000): ``benchdb.isys_obj``."""
    server.sql(
        "DROP DATABASE IF EXISTS benchdb; CREATE DATABASE benchdb;"
        "CREATE TABLE benchdb.isys_obj (id INT UNSIGNED PRIMARY KEY, title VARCHAR(255),"
        " sysid VARCHAR(64), created DATETIME, status TINYINT, descr TEXT) ENGINE=InnoDB;"
    )
    step = 500_000
    for start in range(1, rows + 1, step):
        end = min(rows, start + step - 1)
        server.sql(
            "USE benchdb; INSERT INTO isys_obj"
            " SELECT seq, CONCAT('Server ', seq, ' rack ', seq % 40),"
            " CONCAT('SYSID_', LPAD(seq, 12, '0')), '2020-01-01' + INTERVAL seq SECOND,"
            " seq % 3, IF(seq % 5 = 0, NULL, CONCAT('note ', MD5(seq)))"
            f" FROM seq_{start}_to_{end};"
        )


_LARGE_SCHEMA = """
DROP DATABASE IF EXISTS idoit_system; DROP DATABASE IF EXISTS idoit_data;
CREATE DATABASE idoit_system CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE TABLE idoit_system.isys_mandator (
  isys_mandator__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_mandator__title VARCHAR(255) NOT NULL,
  isys_mandator__db_name VARCHAR(64) NOT NULL UNIQUE
) ENGINE=InnoDB;
INSERT INTO idoit_system.isys_mandator (isys_mandator__title, isys_mandator__db_name)
  VALUES ('Default tenant', 'idoit_data');
USE idoit_system;
CREATE TABLE idoit_system.isys_settings (
  isys_settings__key VARCHAR(190) NOT NULL PRIMARY KEY,
  isys_settings__value TEXT NULL
) ENGINE=InnoDB;
INSERT INTO idoit_system.isys_settings
  SELECT CONCAT('cmdb.setting.', seq), REPEAT(CHAR(65 + seq % 26), 1 + seq % 40)
  FROM seq_1_to_3000;
CREATE DATABASE idoit_data CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
USE idoit_data;
CREATE TABLE isys_obj_type (
  isys_obj_type__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_obj_type__const VARCHAR(190) NOT NULL UNIQUE,
  isys_obj_type__title VARCHAR(255) NOT NULL
) ENGINE=InnoDB;
INSERT INTO isys_obj_type (isys_obj_type__const, isys_obj_type__title)
  SELECT CONCAT('C__OBJTYPE__TYPE_', seq), CONCAT('Object type ', seq) FROM seq_1_to_60;
CREATE TABLE isys_obj (
  isys_obj__id INT UNSIGNED NOT NULL PRIMARY KEY,
  isys_obj__title VARCHAR(255) NOT NULL,
  isys_obj__isys_obj_type__id INT UNSIGNED NOT NULL,
  isys_obj__sysid VARCHAR(64) NOT NULL UNIQUE,
  isys_obj__created DATETIME NOT NULL,
  isys_obj__updated DATETIME NULL,
  isys_obj__status INT NOT NULL DEFAULT 2,
  isys_obj__description MEDIUMTEXT NULL,
  KEY obj_type (isys_obj__isys_obj_type__id),
  CONSTRAINT isys_obj_ibfk_1 FOREIGN KEY (isys_obj__isys_obj_type__id)
    REFERENCES isys_obj_type (isys_obj_type__id)
) ENGINE=InnoDB;
CREATE TABLE isys_catg_global_list (
  isys_catg_global_list__id INT UNSIGNED NOT NULL PRIMARY KEY,
  isys_catg_global_list__isys_obj__id INT UNSIGNED NOT NULL,
  isys_catg_global_list__description TEXT NULL,
  isys_catg_global_list__status INT NOT NULL DEFAULT 2,
  CONSTRAINT isys_catg_global_list_ibfk_1 FOREIGN KEY (isys_catg_global_list__isys_obj__id)
    REFERENCES isys_obj (isys_obj__id) ON DELETE CASCADE
) ENGINE=InnoDB;
CREATE TABLE isys_catg_ip_list (
  isys_catg_ip_list__id INT UNSIGNED NOT NULL PRIMARY KEY,
  isys_catg_ip_list__isys_obj__id INT UNSIGNED NOT NULL,
  isys_catg_ip_list__hostname VARCHAR(255) NULL,
  isys_catg_ip_list__address VARBINARY(16) NOT NULL,
  isys_catg_ip_list__primary TINYINT(1) NOT NULL DEFAULT 0,
  CONSTRAINT isys_catg_ip_list_ibfk_1 FOREIGN KEY (isys_catg_ip_list__isys_obj__id)
    REFERENCES isys_obj (isys_obj__id) ON DELETE CASCADE
) ENGINE=InnoDB;
CREATE TABLE isys_catg_memory_list (
  isys_catg_memory_list__id INT UNSIGNED NOT NULL PRIMARY KEY,
  isys_catg_memory_list__isys_obj__id INT UNSIGNED NOT NULL,
  isys_catg_memory_list__capacity BIGINT UNSIGNED NOT NULL,
  isys_catg_memory_list__unit ENUM('KB','MB','GB','TB') NOT NULL DEFAULT 'GB',
  CONSTRAINT isys_catg_memory_list_ibfk_1 FOREIGN KEY (isys_catg_memory_list__isys_obj__id)
    REFERENCES isys_obj (isys_obj__id) ON DELETE CASCADE
) ENGINE=InnoDB;
CREATE TABLE isys_logbook (
  isys_logbook__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_logbook__isys_obj__id INT UNSIGNED NULL,
  isys_logbook__event VARCHAR(64) NOT NULL,
  isys_logbook__date DATETIME NOT NULL,
  isys_logbook__changes MEDIUMTEXT NULL,
  KEY logbook_date (isys_logbook__date),
  CONSTRAINT isys_logbook_ibfk_1 FOREIGN KEY (isys_logbook__isys_obj__id)
    REFERENCES isys_obj (isys_obj__id) ON DELETE SET NULL
) ENGINE=InnoDB;
CREATE VIEW isys_v_obj_overview AS
  SELECT o.isys_obj__id AS id, o.isys_obj__title AS title, t.isys_obj_type__title AS type
  FROM isys_obj o JOIN isys_obj_type t ON t.isys_obj_type__id = o.isys_obj__isys_obj_type__id;
CREATE TRIGGER isys_obj_after_update AFTER UPDATE ON isys_obj FOR EACH ROW
  INSERT INTO isys_logbook (isys_logbook__isys_obj__id, isys_logbook__event,
                            isys_logbook__date, isys_logbook__changes)
  VALUES (NEW.isys_obj__id, 'C__LOGBOOK_EVENT__OBJECT_CHANGED', '2024-06-01', OLD.isys_obj__title);
CREATE FUNCTION isys_obj_count(type_id INT UNSIGNED) RETURNS INT READS SQL DATA
  RETURN (SELECT COUNT(*) FROM isys_obj WHERE isys_obj__isys_obj_type__id = type_id);
CREATE EVENT isys_ev_cleanup ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 00:00:00' DISABLE
  DO DELETE FROM isys_logbook WHERE isys_logbook__date < '2000-01-01';
"""

#: per chunk of objects [{a}, {b}]: the statements that fill every big table (3 logbook rows
#: and 2 addresses per object)
_LARGE_CHUNK = """
SET foreign_key_checks = 0, unique_checks = 0;
USE idoit_data;
INSERT INTO isys_obj
  SELECT seq, CONCAT('Object ', seq, IF(seq % 11 = 0, ' \u2013 Ünïcødé', '')), 1 + seq % 60,
         CONCAT('SYSID_', LPAD(seq, 10, '0')), '2020-01-01' + INTERVAL seq MINUTE,
         IF(seq % 5 = 0, NULL, '2024-01-01' + INTERVAL seq SECOND), IF(seq % 50 = 0, 3, 2),
         IF(seq % 3 = 0, NULL, CONCAT('Rack ', seq % 40, ', row ', seq % 7, '; serial ',
            UPPER(MD5(seq)), '; ordered by purchasing, see ticket #', seq % 9973,
            '; contact: ops-team-', seq % 17, '@example.org; ', SHA2(seq, 256)))
  FROM seq_{a}_to_{b};
INSERT INTO isys_catg_global_list
  SELECT seq, seq, IF(seq % 4 = 0, NULL, CONCAT('Global category of ', seq, ' ', MD5(seq))),
         2 - seq % 2
  FROM seq_{a}_to_{b};
INSERT INTO isys_catg_ip_list
  SELECT seq, 1 + (seq - 1) DIV 2, CONCAT('host', seq, '.dc', seq % 5, '.example.org'),
         INET6_ATON(CONCAT('10.', seq DIV 65536 % 256, '.', seq DIV 256 % 256, '.', seq % 256)),
         seq % 2
  FROM seq_{a2}_to_{b2};
INSERT INTO isys_catg_memory_list
  SELECT seq, seq, (seq % 64 + 1) * 1024, ELT(1 + seq % 4, 'KB', 'MB', 'GB', 'TB')
  FROM seq_{a}_to_{b};
INSERT INTO isys_logbook
  SELECT seq, IF(seq % 9 = 0, NULL, 1 + (seq - 1) DIV 3),
         ELT(1 + seq % 3, 'C__LOGBOOK_EVENT__OBJECT_CREATED', 'C__LOGBOOK_EVENT__OBJECT_CHANGED',
             'C__LOGBOOK_EVENT__CATEGORY_CHANGED'),
         '2020-01-01' + INTERVAL seq * 20 SECOND,
         CONCAT('a:2:{{s:15:"isys_obj__title";a:2:{{s:4:"from";s:', LENGTH(seq) + 7,
                ':"Object ', seq, '";s:2:"to";s:', LENGTH(seq) + 7, ':"Server ', seq,
                '";}}s:21:"isys_obj__description";a:2:{{s:4:"from";s:32:"', MD5(seq),
                '";s:2:"to";s:64:"', SHA2(seq, 256), '";}}s:4:"user";s:',
                LENGTH(seq % 23) + 6, ':"admin', seq % 23, '";}}')
  FROM seq_{a3}_to_{b3};
"""


def idoit_large(server: SqlServer, gigabytes: float) -> dict[str, int]:
    """(Re)create the 5 GB fixture (``gigabytes`` = 5) and return DATA_LENGTH + INDEX_LENGTH
    per table (after ANALYZE TABLE, so the figures are current).

    Sized by :data:`BYTES_PER_OBJECT`: 5 GB are about 2.7 M objects, 5.5 M addresses, 8.2 M
    logbook entries, 19 M rows in all."""
    objects = max(1, int(gigabytes * 1e9 / BYTES_PER_OBJECT))
    server.sql(_LARGE_SCHEMA)
    for a in range(1, objects + 1, CHUNK):
        b = min(objects, a + CHUNK - 1)
        server.sql(_LARGE_CHUNK.format(a=a, b=b, a2=2 * a - 1, b2=2 * b, a3=3 * a - 2, b3=3 * b))
    return table_sizes(server, LARGE_DATABASES)


def table_sizes(server: SqlServer, databases: tuple[str, ...]) -> dict[str, int]:
    names = ", ".join(f"'{d}'" for d in databases)
    server.sql(
        "".join(
            f"ANALYZE TABLE {row[0]};"
            for row in lab.mysql_rows(
                "SELECT CONCAT('`', TABLE_SCHEMA, '`.`', TABLE_NAME, '`')"
                f" FROM information_schema.TABLES WHERE TABLE_SCHEMA IN ({names})"
                " AND TABLE_TYPE = 'BASE TABLE';",
                server.socket,
            )
        )
    )
    rows = lab.mysql_rows(
        "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME), DATA_LENGTH + INDEX_LENGTH"
        f" FROM information_schema.TABLES WHERE TABLE_SCHEMA IN ({names})"
        " AND TABLE_TYPE = 'BASE TABLE' ORDER BY 2 DESC;",
        server.socket,
    )
    return {name: int(size) for name, size in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=5.0)
    args = parser.parse_args()
    sandbox.enter("bench.dumpdata", sys.argv[1:])
    server = lab.start_scratch_mariadb()
    try:
        started = time.monotonic()
        sizes = idoit_large(server, args.gigabytes)
        print(f"generated in {time.monotonic() - started:.0f} s")
        for name, size in sizes.items():
            print(f"{name:40} {size / 1e6:10.1f} MB")
        print(f"{'total':40} {sum(sizes.values()) / 1e6:10.1f} MB")
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
