DROP TABLE users;
DROP TABLE items;
