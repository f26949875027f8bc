DROP TABLE users;
DROP TABLE children;
DROP TABLE parents;
DROP TABLE items;
