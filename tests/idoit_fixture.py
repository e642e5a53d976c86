"""An i-doit-like dataset for the lab MariaDB (tests, bench/ and by hand).

Two databases like an i-doit installation: ``idoit_system`` (tenants, licences, settings) and
``idoit_data`` (CMDB objects ``isys_obj`` and category tables ``isys_catg_*_list`` that reference
it). InnoDB tables linked by foreign keys, >= 100k rows, a view, a trigger, a function, a
procedure and an event. The child tables ``isys_catg_*`` sort BEFORE their parent ``isys_obj``
in mysqldump output, as in i-doit: that ordering is what makes a restore over a changed schema
fail with errno 150 (see :func:`mutate_schema_for_errno150`).

The data is deterministic (no NOW()/RAND()), so every build has the same CHECKSUM TABLE values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from tests.lab import mysql_exec, mysql_rows, row_counts, table_checksums

DATABASES = ("idoit_data", "idoit_system")
#: Rows of isys_obj at scale 1; the whole dataset holds about 6 times as many.
BASE_OBJECTS = 20_000
#: The table that the errno-150 mutation adds.
ERRNO150_NEW_TABLE = "idoit_data.isys_catg_cloud_list"
#: The child table the errno-150 restore loses (the first one in the dump).
ERRNO150_LOST_TABLE = "idoit_data.isys_catg_global_list"
#: Child tables of isys_obj (all sort before it in mysqldump output).
CATG_TABLES = (
    "isys_catg_global_list",
    "isys_catg_ip_list",
    "isys_catg_memory_list",
)

_SYSTEM_SQL = """
DROP DATABASE IF EXISTS idoit_system;
CREATE DATABASE idoit_system CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
USE idoit_system;
CREATE TABLE isys_mandator (
  isys_mandator__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_mandator__title VARCHAR(255) NOT NULL,
  isys_mandator__db_name VARCHAR(64) NOT NULL UNIQUE,
  isys_mandator__active TINYINT(1) NOT NULL DEFAULT 1
) ENGINE=InnoDB;
CREATE TABLE isys_licence (
  isys_licence__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_licence__isys_mandator__id INT UNSIGNED NOT NULL,
  isys_licence__key VARBINARY(64) NOT NULL,
  isys_licence__expires DATE NULL,
  CONSTRAINT isys_licence_ibfk_1 FOREIGN KEY (isys_licence__isys_mandator__id)
    REFERENCES isys_mandator (isys_mandator__id) ON DELETE CASCADE
) ENGINE=InnoDB;
CREATE TABLE isys_settings (
  isys_settings__key VARCHAR(190) NOT NULL,
  isys_settings__isys_mandator__id INT UNSIGNED NULL,
  isys_settings__value TEXT NULL,
  UNIQUE KEY settings_key (isys_settings__key, isys_settings__isys_mandator__id),
  CONSTRAINT isys_settings_ibfk_1 FOREIGN KEY (isys_settings__isys_mandator__id)
    REFERENCES isys_mandator (isys_mandator__id) ON DELETE CASCADE
) ENGINE=InnoDB;
INSERT INTO isys_mandator (isys_mandator__title, isys_mandator__db_name)
  VALUES ('Default tenant', 'idoit_data'), ('Test tenant', 'idoit_test'), ('Ünïcødé ✓', 'idoit_u');
INSERT INTO isys_licence (isys_licence__isys_mandator__id, isys_licence__key, isys_licence__expires)
  SELECT 1 + seq % 3, UNHEX(SHA2(seq, 256)), '2030-01-01' + INTERVAL seq DAY FROM seq_1_to_10;
INSERT INTO isys_settings
  SELECT CONCAT('cmdb.setting.', seq), IF(seq % 4 = 0, NULL, 1 + seq % 3),
         IF(seq % 7 = 0, NULL, REPEAT(CHAR(65 + seq % 26), 1 + seq % 40))
  FROM seq_1_to_300;
"""

_DATA_SQL = """
DROP DATABASE IF EXISTS idoit_data;
CREATE DATABASE idoit_data CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
USE idoit_data;
CREATE TABLE isys_obj_type (
  isys_obj_type__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_obj_type__const VARCHAR(190) NOT NULL UNIQUE,
  isys_obj_type__title VARCHAR(255) NOT NULL
) ENGINE=InnoDB;
CREATE TABLE isys_obj (
  isys_obj__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
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
  isys_catg_global_list__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_catg_global_list__isys_obj__id INT UNSIGNED NOT NULL,
  isys_catg_global_list__description TEXT NULL,
  isys_catg_global_list__status INT NOT NULL DEFAULT 2,
  CONSTRAINT isys_catg_global_list_ibfk_1 FOREIGN KEY (isys_catg_global_list__isys_obj__id)
    REFERENCES isys_obj (isys_obj__id) ON DELETE CASCADE ON UPDATE CASCADE
) ENGINE=InnoDB;
CREATE TABLE isys_catg_ip_list (
  isys_catg_ip_list__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  isys_catg_ip_list__isys_obj__id INT UNSIGNED NOT NULL,
  isys_catg_ip_list__hostname VARCHAR(255) NULL,
  isys_catg_ip_list__address VARBINARY(16) NOT NULL,
  isys_catg_ip_list__primary TINYINT(1) NOT NULL DEFAULT 0,
  CONSTRAINT isys_catg_ip_list_ibfk_1 FOREIGN KEY (isys_catg_ip_list__isys_obj__id)
    REFERENCES isys_obj (isys_obj__id) ON DELETE CASCADE
) ENGINE=InnoDB;
CREATE TABLE isys_catg_memory_list (
  isys_catg_memory_list__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
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
  isys_logbook__changes BLOB NULL,
  CONSTRAINT isys_logbook_ibfk_1 FOREIGN KEY (isys_logbook__isys_obj__id)
    REFERENCES isys_obj (isys_obj__id) ON DELETE SET NULL
) ENGINE=InnoDB;

INSERT INTO isys_obj_type (isys_obj_type__const, isys_obj_type__title)
  SELECT CONCAT('C__OBJTYPE__TYPE_', seq), CONCAT('Object type ', seq) FROM seq_1_to_60;
INSERT INTO isys_obj (isys_obj__title, isys_obj__isys_obj_type__id, isys_obj__sysid,
                      isys_obj__created, isys_obj__updated, isys_obj__status,
                      isys_obj__description)
  SELECT CONCAT('Object ', seq, IF(seq % 11 = 0, ' \u2013 Ünïcødé', '')), 1 + seq % 60,
         CONCAT('SYSID_', LPAD(seq, 10, '0')),
         '2020-01-01 00:00:00' + INTERVAL seq MINUTE,
         IF(seq % 5 = 0, NULL, '2024-01-01 00:00:00' + INTERVAL seq SECOND),
         IF(seq % 50 = 0, 3, 2),
         IF(seq % 3 = 0, NULL, CONCAT(SHA2(seq, 256), REPEAT('x', {payload})))
  FROM seq_1_to_{objects};
INSERT INTO isys_catg_global_list (isys_catg_global_list__isys_obj__id,
                                   isys_catg_global_list__description)
  SELECT seq, IF(seq % 4 = 0, NULL, MD5(seq)) FROM seq_1_to_{objects};
INSERT INTO isys_catg_ip_list (isys_catg_ip_list__isys_obj__id, isys_catg_ip_list__hostname,
                               isys_catg_ip_list__address, isys_catg_ip_list__primary)
  SELECT 1 + (seq - 1) DIV 2, CONCAT('host', seq, '.example.org'),
         INET6_ATON(CONCAT('10.', seq DIV 65536 % 256, '.', seq DIV 256 % 256, '.', seq % 256)),
         seq % 2
  FROM seq_1_to_{ips};
INSERT INTO isys_catg_memory_list (isys_catg_memory_list__isys_obj__id,
                                   isys_catg_memory_list__capacity, isys_catg_memory_list__unit)
  SELECT seq, (seq % 64 + 1) * 1024, ELT(1 + seq % 4, 'KB', 'MB', 'GB', 'TB')
  FROM seq_1_to_{objects};
INSERT INTO isys_logbook (isys_logbook__isys_obj__id, isys_logbook__event, isys_logbook__date,
                          isys_logbook__changes)
  SELECT IF(seq % 9 = 0, NULL, seq), 'C__LOGBOOK_EVENT__OBJECT_CREATED',
         '2020-01-01 00:00:00' + INTERVAL seq MINUTE, UNHEX(MD5(seq))
  FROM seq_1_to_{objects};

CREATE VIEW isys_v_obj_overview AS
  SELECT o.isys_obj__id AS id, o.isys_obj__title AS title, t.isys_obj_type__title AS type,
         (SELECT COUNT(*) FROM isys_catg_ip_list i
           WHERE i.isys_catg_ip_list__isys_obj__id = o.isys_obj__id) AS ips
  FROM isys_obj o JOIN isys_obj_type t ON t.isys_obj_type__id = o.isys_obj__isys_obj_type__id;

DELIMITER //
CREATE TRIGGER isys_obj_after_update AFTER UPDATE ON isys_obj FOR EACH ROW
BEGIN
  IF NEW.isys_obj__title <> OLD.isys_obj__title THEN
    INSERT INTO isys_logbook (isys_logbook__isys_obj__id, isys_logbook__event,
                              isys_logbook__date, isys_logbook__changes)
    VALUES (NEW.isys_obj__id, 'C__LOGBOOK_EVENT__OBJECT_CHANGED',
            COALESCE(NEW.isys_obj__updated, '2024-06-01 00:00:00'), OLD.isys_obj__title);
  END IF;
END//
CREATE FUNCTION isys_obj_count(type_id INT UNSIGNED) RETURNS INT
  READS SQL DATA
BEGIN
  RETURN (SELECT COUNT(*) FROM isys_obj WHERE isys_obj__isys_obj_type__id = type_id);
END//
CREATE PROCEDURE isys_obj_archive(IN obj_id INT UNSIGNED)
  MODIFIES SQL DATA
BEGIN
  UPDATE isys_obj SET isys_obj__status = 3 WHERE isys_obj__id = obj_id;
END//
DELIMITER ;
CREATE EVENT isys_ev_cleanup ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 00:00:00' DISABLE
  DO DELETE FROM isys_logbook WHERE isys_logbook__date < '2000-01-01';
"""


def create_idoit_dataset(
    socket: str | None = None, *, scale: float = 1.0, payload: int = 0
) -> dict[str, int]:
    """(Re)create both databases from scratch; return the exact row count per table.

    ``scale`` multiplies the row counts (1.0: about 120k rows); ``payload`` adds that many bytes
    of text to two thirds of the isys_obj rows (bench/ uses it to reach a GB).
    """
    objects = max(1, int(BASE_OBJECTS * scale))
    data_sql = (
        _DATA_SQL.replace("{objects}", str(objects))
        .replace("{ips}", str(2 * objects))
        .replace("{payload}", str(int(payload)))
    )
    mysql_exec(_SYSTEM_SQL + data_sql, socket)
    return row_counts(DATABASES, socket)


def drop_idoit_dataset(socket: str | None = None) -> None:
    mysql_exec("DROP DATABASE IF EXISTS idoit_data; DROP DATABASE IF EXISTS idoit_system;", socket)


def schema_objects(socket: str | None = None) -> dict[str, list[str]]:
    """Names of the views, triggers, routines, events and foreign keys in the databases."""
    dbs = "'idoit_data', 'idoit_system'"
    queries = {
        "views": "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME) FROM information_schema.VIEWS "
        f"WHERE TABLE_SCHEMA IN ({dbs})",
        "triggers": "SELECT CONCAT(TRIGGER_SCHEMA, '.', TRIGGER_NAME) "
        f"FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA IN ({dbs})",
        "routines": "SELECT CONCAT(ROUTINE_SCHEMA, '.', ROUTINE_NAME, ' ', ROUTINE_TYPE) "
        f"FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA IN ({dbs})",
        "events": "SELECT CONCAT(EVENT_SCHEMA, '.', EVENT_NAME) FROM information_schema.EVENTS "
        f"WHERE EVENT_SCHEMA IN ({dbs})",
        "foreign_keys": "SELECT CONCAT(CONSTRAINT_SCHEMA, '.', TABLE_NAME, ' -> ', "
        "REFERENCED_TABLE_NAME) FROM information_schema.REFERENTIAL_CONSTRAINTS "
        f"WHERE CONSTRAINT_SCHEMA IN ({dbs})",
    }
    return {
        kind: sorted(row[0] for row in mysql_rows(sql, socket)) for kind, sql in queries.items()
    }


def schema_fingerprint(socket: str | None = None) -> str:
    """A hash of every column definition, constraint and schema object of the two databases."""
    dbs = "'idoit_data', 'idoit_system'"
    columns = mysql_rows(
        "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, "
        "COALESCE(COLUMN_DEFAULT, 'NULL'), EXTRA FROM information_schema.COLUMNS "
        f"WHERE TABLE_SCHEMA IN ({dbs}) ORDER BY 1, 2, ORDINAL_POSITION",
        socket,
    )
    text = repr((columns, schema_objects(socket)))
    return hashlib.sha256(text.encode()).hexdigest()


def mutate_schema_for_errno150(socket: str | None = None) -> None:
    """The schema change (after a dump was taken) that breaks a restore over existing tables.

    Drop the foreign keys to ``isys_obj``, widen the parent key and the child columns to
    BIGINT, re-add the foreign keys, add another table referencing the parent. Loading the
    older dump over this then fails at the first ``isys_catg_*`` table (it sorts before
    ``isys_obj``): ``ERROR 1005 ... errno: 150 "Foreign key constraint is incorrectly formed"``
    -- after that table was dropped by the dump, so it is lost.
    """
    children = [
        (table, f"{table}__isys_obj__id", f"{table}_ibfk_1", "CASCADE", "NOT NULL")
        for table in CATG_TABLES
    ] + [("isys_logbook", "isys_logbook__isys_obj__id", "isys_logbook_ibfk_1", "SET NULL", "NULL")]
    sql = ["USE idoit_data;"]
    sql += [f"ALTER TABLE {t} DROP FOREIGN KEY {fk};" for t, _, fk, _, _ in children]
    sql.append("ALTER TABLE isys_obj MODIFY isys_obj__id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT;")
    sql += [
        f"ALTER TABLE {t} MODIFY {col} BIGINT UNSIGNED {null};" for t, col, _, _, null in children
    ]
    sql += [
        f"ALTER TABLE {t} ADD CONSTRAINT {fk} FOREIGN KEY ({col}) "
        f"REFERENCES isys_obj (isys_obj__id) ON DELETE {action};"
        for t, col, fk, action, _ in children
    ]
    sql.append(
        "CREATE TABLE isys_catg_cloud_list ("
        " isys_catg_cloud_list__id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,"
        " isys_catg_cloud_list__isys_obj__id BIGINT UNSIGNED NOT NULL,"
        " isys_catg_cloud_list__provider VARCHAR(64) NOT NULL,"
        " CONSTRAINT isys_catg_cloud_list_ibfk_1 FOREIGN KEY (isys_catg_cloud_list__isys_obj__id)"
        "   REFERENCES isys_obj (isys_obj__id) ON DELETE CASCADE) ENGINE=InnoDB;"
        "INSERT INTO isys_catg_cloud_list (isys_catg_cloud_list__isys_obj__id,"
        " isys_catg_cloud_list__provider) SELECT seq, 'aws' FROM seq_1_to_100;"
    )
    mysql_exec("\n".join(sql), socket)


def mutate_data(socket: str | None = None) -> None:
    """Change data in both databases (updates fire the trigger, deletes cascade)."""
    mysql_exec(
        "USE idoit_data;"
        "UPDATE isys_obj SET isys_obj__title = CONCAT(isys_obj__title, ' (changed)')"
        " WHERE isys_obj__id % 97 = 0;"
        "DELETE FROM isys_obj WHERE isys_obj__id % 101 = 0;"
        "INSERT INTO isys_obj (isys_obj__title, isys_obj__isys_obj_type__id, isys_obj__sysid,"
        " isys_obj__created) VALUES ('new after dump', 1, 'SYSID_NEW_1', '2025-01-01');"
        "UPDATE idoit_system.isys_settings SET isys_settings__value = 'changed'"
        " WHERE isys_settings__key LIKE 'cmdb.setting.1%';",
        socket,
    )


@dataclass(frozen=True)
class IdoitDB:
    """The pristine i-doit-like dataset as it was built, and the server (socket) holding it."""

    databases: tuple[str, ...]
    checksums: dict[str, int | None]
    row_counts: dict[str, int]
    schema: str
    objects: dict[str, list[str]] = field(default_factory=dict)
    socket: str | None = None

    @property
    def total_rows(self) -> int:
        return sum(self.row_counts.values())

    def current_checksums(self) -> dict[str, int | None]:
        return table_checksums(self.databases, self.socket)

    def is_pristine(self) -> bool:
        """Same data (CHECKSUM TABLE) and same schema as when it was built."""
        return (
            self.current_checksums() == self.checksums
            and schema_fingerprint(self.socket) == self.schema
        )

    def rebuild(self) -> None:
        create_idoit_dataset(self.socket)

    def mutate_schema_for_errno150(self) -> None:
        mutate_schema_for_errno150(self.socket)

    def mutate_data(self) -> None:
        mutate_data(self.socket)


def build_idoit(socket: str | None = None) -> IdoitDB:
    """Create the dataset and record its baseline."""
    counts = create_idoit_dataset(socket)
    return IdoitDB(
        databases=DATABASES,
        checksums=table_checksums(DATABASES, socket),
        row_counts=counts,
        schema=schema_fingerprint(socket),
        objects=schema_objects(socket),
        socket=socket,
    )


def remove_broken_view(socket: str | None = None) -> None:
    """Undo :func:`add_broken_view` (the ``idoit_db`` fixture does, after each test), so a later
    test that dumps the server without asking for the dataset is not broken by it."""
    mysql_exec("DROP VIEW IF EXISTS idoit_data.isys_v_broken;", socket, check=False)


def add_broken_view(socket: str | None = None) -> None:
    """Make mysqldump fail mid-stream: a view whose table is gone.

    mysqldump writes every table's data, then exits 2 at this view (``SHOW FIELDS ... (1356)``)
    without its "-- Dump completed" marker. The idoit_db fixture rebuilds the dataset afterwards.
    """
    mysql_exec(
        "USE idoit_data;"
        "CREATE TABLE isys_tmp_gone (a INT);"
        "CREATE VIEW isys_v_broken AS SELECT a FROM isys_tmp_gone;"
        "DROP TABLE isys_tmp_gone;",
        socket,
    )
