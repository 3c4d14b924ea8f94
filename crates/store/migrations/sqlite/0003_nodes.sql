-- dps store schema v3 (SQLite): node heartbeats. Each running dps process keeps one row fresh;
-- an intent (a registration `assigning` on a hub outside the store) names the node that wrote it,
-- and recovery takes over only the intents of nodes whose row has expired. Times are Unix
-- milliseconds. (SQLite serves one node; the table is here so that both engines run the same
-- node logic.)
CREATE TABLE nodes (
    id        TEXT PRIMARY KEY NOT NULL,
    name      TEXT NOT NULL,
    started   INTEGER NOT NULL,
    heartbeat INTEGER NOT NULL,
    expires   INTEGER NOT NULL
);
