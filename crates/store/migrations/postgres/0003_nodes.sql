-- dps store schema v3 (PostgreSQL): node heartbeats, and change notifications.
--
-- Each running dps process keeps one row of `nodes` fresh; an intent (a registration `assigning`
-- on a hub outside the store) names the node that wrote it, and recovery takes over only the
-- intents of nodes whose row has expired. Times are Unix milliseconds.
CREATE TABLE nodes (
    id        TEXT PRIMARY KEY COLLATE "C",
    name      TEXT NOT NULL,
    started   BIGINT NOT NULL,
    heartbeat BIGINT NOT NULL,
    expires   BIGINT NOT NULL
);

-- Every change of what nodes cache (instances with their linked hubs and access policies,
-- enrollment groups, individual enrollments, CA certificates, the deny list) is announced on the
-- channel `dps_changes` as `<schema> <collection> <scope>` (a listener ignores other schemas), delivered at the commit. Nodes LISTEN and drop
-- their caches at once; their periodic reload stays as the fallback. Registration records and the
-- built-in hub's identities (the hot path) are not announced: the WHEN clauses are evaluated
-- without calling the function.
CREATE FUNCTION dps_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('dps_changes', TG_TABLE_SCHEMA || ' ' || OLD.collection || ' ' || OLD.scope);
    ELSE
        PERFORM pg_notify('dps_changes', TG_TABLE_SCHEMA || ' ' || NEW.collection || ' ' || NEW.scope);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER docs_notify_write AFTER INSERT OR UPDATE ON docs FOR EACH ROW
    WHEN (NEW.collection NOT IN ('registration', 'hubdevice'))
    EXECUTE FUNCTION dps_notify_change();
CREATE TRIGGER docs_notify_delete AFTER DELETE ON docs FOR EACH ROW
    WHEN (OLD.collection NOT IN ('registration', 'hubdevice'))
    EXECUTE FUNCTION dps_notify_change();
