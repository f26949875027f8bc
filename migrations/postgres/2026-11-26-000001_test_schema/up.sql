-- The schema the test suite and examples use.
CREATE TABLE items (
    id SERIAL PRIMARY KEY,
    tag TEXT NOT NULL,
    v INTEGER NOT NULL,
    CONSTRAINT items_tag_v_key UNIQUE (tag, v)
);

-- A unique constraint checked at COMMIT, not at INSERT.
CREATE TABLE deferred_items (
    id SERIAL PRIMARY KEY,
    tag TEXT NOT NULL,
    v INTEGER NOT NULL,
    CONSTRAINT deferred_items_tag_v_key UNIQUE (tag, v) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE users (
    id SERIAL PRIMARY KEY,
    email TEXT NOT NULL UNIQUE
);
