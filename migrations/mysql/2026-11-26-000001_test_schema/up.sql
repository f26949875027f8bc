-- The schema the test suite and examples use. (MySQL has no deferred constraints.)
CREATE TABLE items (
    id INTEGER AUTO_INCREMENT PRIMARY KEY,
    tag VARCHAR(191) NOT NULL,
    v INTEGER NOT NULL,
    CONSTRAINT items_tag_v_key UNIQUE (tag, v)
) ENGINE = InnoDB;

CREATE TABLE users (
    id INTEGER AUTO_INCREMENT PRIMARY KEY,
    email VARCHAR(191) NOT NULL UNIQUE
) ENGINE = InnoDB;
