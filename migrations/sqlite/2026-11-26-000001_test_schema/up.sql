-- The schema the test suite and examples use.
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tag TEXT NOT NULL,
    v INTEGER NOT NULL,
    UNIQUE (tag, v)
);

-- A foreign key checked at COMMIT, not at INSERT (needs PRAGMA foreign_keys = ON).
CREATE TABLE parents (
    id INTEGER PRIMARY KEY
);
CREATE TABLE children (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent_id INTEGER NOT NULL REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE
);
