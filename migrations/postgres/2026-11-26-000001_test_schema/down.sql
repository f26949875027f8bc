DROP TABLE users;
DROP TABLE deferred_items;
DROP TABLE items;
