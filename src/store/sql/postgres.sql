-- Gimlet's SQL store, PostgreSQL (`gimlet migrate --print postgres`).
-- Applied by the gateway at its first connection (store.sql.create_schema)
-- or by `gimlet migrate -c FILE`; idempotent.
BEGIN;
SELECT pg_advisory_xact_lock(7262013);

-- Byte counts (the session limits) are UTF-8 bytes.
DO $$ BEGIN
  IF current_setting('server_encoding') <> 'UTF8' THEN
    RAISE EXCEPTION 'the database encoding is %, Gimlet needs UTF8', current_setting('server_encoding');
  END IF;
END $$;

-- One row per session: its absolute expiry (ms since the epoch) and the
-- running totals of its server-side keys and bytes (key + value, every
-- channel), so a write checks the session limits without reading the rest.
CREATE TABLE IF NOT EXISTS gimlet_sessions (
  id         text    PRIMARY KEY,
  tag        bigint  NOT NULL,
  expires    bigint  NOT NULL,
  key_count  integer NOT NULL,
  byte_count bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS gimlet_sessions_expires ON gimlet_sessions (expires);

-- One row per key: channel 0 = p, 1 = t, 2 = sp, 3 = st. Values are bytea:
-- a session value may hold any character, U+0000 too, which text cannot.
CREATE TABLE IF NOT EXISTS gimlet_data (
  id    text     NOT NULL,
  ch    smallint NOT NULL,
  name  text     NOT NULL,
  value bytea    NOT NULL,
  PRIMARY KEY (id, ch, name)
);

-- Ended ids (session.revocation) and regenerated ids' forwards
-- (session.regenerate_grace), each until its own expiry.
CREATE TABLE IF NOT EXISTS gimlet_marks (
  id            text PRIMARY KEY,
  ended_until   bigint,
  forward       text,
  forward_until bigint
);
CREATE INDEX IF NOT EXISTS gimlet_marks_until
  ON gimlet_marks ((greatest(coalesce(ended_until, 0), coalesce(forward_until, 0))));

-- Users' indexes (session.user_key): the user's hash, one row per session.
CREATE TABLE IF NOT EXISTS gimlet_users (
  uh      text   NOT NULL,
  id      text   NOT NULL,
  created bigint NOT NULL,
  expires bigint NOT NULL,
  entry   text   NOT NULL,
  PRIMARY KEY (uh, id)
);
CREATE INDEX IF NOT EXISTS gimlet_users_expires ON gimlet_users (expires);

-- The store's clock, in ms: expiry is judged by one clock for every gateway.
CREATE OR REPLACE FUNCTION gimlet_now() RETURNS bigint
  LANGUAGE sql STABLE AS $$ SELECT (extract(epoch FROM now()) * 1000)::bigint $$;

-- One response's write (the JSON of SqlStore::batch_json), all or nothing.
-- Returns 'ok' and the user-index entries session.max_per_user evicted, or
-- a refusal found before anything changed ('session_moved' and the new
-- cookies, 'session_ended'); a refusal found while applying (not_integer,
-- overflow, too_many_keys, session_too_large) raises GM001, rolling back.
CREATE OR REPLACE FUNCTION gimlet_write_v1(b jsonb) RETURNS text[]
LANGUAGE plpgsql AS $fn$
DECLARE
  t       bigint  := gimlet_now();
  sid     text    := b->>'id';
  -- A Regenerate to the id itself is no move.
  src     text    := nullif(b->>'rename', b->>'id');
  nkeys   bigint  := 0;
  nbytes  bigint  := 0;
  s       record;
  o       record;
  c       int;
  w       jsonb;
  kv      jsonb;
  vk      text;
  fwd     text;
  vv      bytea;
  vold    bytea;
  vtext   text;
  cur     numeric;
  dk      bigint;
  db      bigint;
  u       jsonb;
  n       bigint;
  evicted text[]  := '{}';
BEGIN
  -- 0. Every id this write touches (the session, a Regenerate's source, a
  -- Destroy's target, ids to end), then every user whose index it
  -- changes, locked in sorted order (the caller sorts): a logout, a
  -- Regenerate and a write racing each other run one after the other,
  -- each seeing what the other did. Cookie-only sessions have no row to
  -- lock, hence the advisory locks.
  FOR vtext IN SELECT jsonb_array_elements_text(b->'locks') LOOP
    PERFORM pg_advisory_xact_lock(hashtextextended('gimlet:' || vtext, 0));
  END LOOP;
  FOR vtext IN SELECT jsonb_array_elements_text(b->'ulocks') LOOP
    PERFORM pg_advisory_xact_lock(hashtextextended('gimlet_users:' || vtext, 0));
  END LOOP;

  -- 1. Refusals on the marks, before anything changes: answered, not
  -- raised (the forward is a credential; a raise would log it).
  IF (b->>'cm')::boolean THEN
    SELECT m.forward INTO fwd FROM gimlet_marks m
      WHERE m.id = b->>'carried' AND m.forward_until > t;
    IF fwd IS NOT NULL THEN
      RETURN ARRAY['session_moved', fwd];
    END IF;
  END IF;
  IF (b->>'ce')::boolean AND EXISTS (SELECT 1 FROM gimlet_marks m
      WHERE m.id = coalesce(src, sid) AND m.ended_until > t) THEN
    RETURN ARRAY['session_ended'];
  END IF;

  -- 2. Destroy.
  IF b->>'destroy' IS NOT NULL THEN
    DELETE FROM gimlet_sessions WHERE id = b->>'destroy';
    DELETE FROM gimlet_data WHERE id = b->>'destroy';
  END IF;

  IF NOT (b->>'donly')::boolean THEN
    -- 3. The session's row, locked: every writer of this session (and the
    -- cleanup) takes it first, so the totals and its keys change together.
    LOOP
      SELECT * INTO s FROM gimlet_sessions WHERE id = sid FOR UPDATE;
      EXIT WHEN FOUND;
      INSERT INTO gimlet_sessions (id, tag, expires, key_count, byte_count)
        VALUES (sid, (b->>'tag')::bigint, 0, 0, 0) ON CONFLICT (id) DO NOTHING;
    END LOOP;
    IF s.expires > t THEN
      nkeys := s.key_count;
      nbytes := s.byte_count;
    ELSIF s.key_count > 0 THEN
      -- Expired, not yet cleaned up: it is gone, whatever comes next.
      DELETE FROM gimlet_data WHERE id = sid;
    END IF;

    -- 4. Regenerate: the old id's keys move (replacing this id's in the
    -- channels the old one holds), its row goes.
    IF src IS NOT NULL THEN
      SELECT * INTO o FROM gimlet_sessions WHERE id = src FOR UPDATE;
      IF FOUND THEN
        DELETE FROM gimlet_sessions WHERE id = src;
        IF o.expires > t AND o.key_count > 0 THEN
          DELETE FROM gimlet_data WHERE id = sid
            AND ch IN (SELECT DISTINCT d.ch FROM gimlet_data d WHERE d.id = src);
          UPDATE gimlet_data SET id = sid WHERE id = src;
          SELECT count(*), coalesce(sum(octet_length(name) + octet_length(value)), 0)
            INTO nkeys, nbytes FROM gimlet_data WHERE id = sid;
        ELSE
          DELETE FROM gimlet_data WHERE id = src;
        END IF;
      END IF;
    END IF;

    -- 5. Each channel: clear, delete, set, incr, in that order; the
    -- totals follow every key changed.
    FOR c IN 0..3 LOOP
      w := b->'ch'->c;
      CONTINUE WHEN w IS NULL OR jsonb_typeof(w) <> 'object';
      IF (w->>'clear')::boolean THEN
        WITH d AS (DELETE FROM gimlet_data WHERE id = sid AND ch = c
                   RETURNING octet_length(name) + octet_length(value) AS len)
          SELECT count(*), coalesce(sum(len), 0) INTO dk, db FROM d;
        nkeys := nkeys - dk;
        nbytes := nbytes - db;
      END IF;
      IF jsonb_array_length(w->'del') > 0 THEN
        WITH d AS (DELETE FROM gimlet_data WHERE id = sid AND ch = c
                     AND name IN (SELECT jsonb_array_elements_text(w->'del'))
                   RETURNING octet_length(name) + octet_length(value) AS len)
          SELECT count(*), coalesce(sum(len), 0) INTO dk, db FROM d;
        nkeys := nkeys - dk;
        nbytes := nbytes - db;
      END IF;
      FOR kv IN SELECT jsonb_array_elements(w->'set') LOOP
        vk := kv->>0;
        vv := decode(kv->>1, 'base64');
        SELECT d.value INTO vold FROM gimlet_data d WHERE d.id = sid AND d.ch = c AND d.name = vk;
        IF FOUND THEN
          nkeys := nkeys - 1;
          nbytes := nbytes - octet_length(vk) - octet_length(vold);
          UPDATE gimlet_data SET value = vv WHERE id = sid AND ch = c AND name = vk;
        ELSE
          INSERT INTO gimlet_data (id, ch, name, value) VALUES (sid, c, vk, vv);
        END IF;
        nkeys := nkeys + 1;
        nbytes := nbytes + octet_length(vk) + octet_length(vv);
      END LOOP;
      FOR kv IN SELECT jsonb_array_elements(w->'incr') LOOP
        vk := kv->>0;
        SELECT d.value INTO vold FROM gimlet_data d WHERE d.id = sid AND d.ch = c AND d.name = vk;
        IF NOT FOUND THEN
          cur := 0;
        ELSIF position('\x00'::bytea IN vold) > 0 THEN
          RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'not_integer', DETAIL = vk;
        ELSE
          vtext := convert_from(vold, 'UTF8');
          -- More than 19 digits (leading zeros aside) is past 64 bits.
          IF vtext !~ '^-?[0-9]+$' OR length(ltrim(ltrim(vtext, '-'), '0')) > 19 THEN
            RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'not_integer', DETAIL = vk;
          END IF;
          cur := vtext::numeric;
          IF cur < -9223372036854775808 OR cur > 9223372036854775807 THEN
            RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'not_integer', DETAIL = vk;
          END IF;
        END IF;
        cur := cur + (kv->>1)::numeric;
        IF cur < -9223372036854775808 OR cur > 9223372036854775807 THEN
          RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'overflow', DETAIL = vk;
        END IF;
        vv := convert_to(cur::bigint::text, 'UTF8');
        IF FOUND THEN
          nbytes := nbytes - octet_length(vold) + octet_length(vv);
          UPDATE gimlet_data SET value = vv WHERE id = sid AND ch = c AND name = vk;
        ELSE
          INSERT INTO gimlet_data (id, ch, name, value) VALUES (sid, c, vk, vv);
          nkeys := nkeys + 1;
          nbytes := nbytes + octet_length(vk) + octet_length(vv);
        END IF;
      END LOOP;
    END LOOP;

    -- 6. The session limits, over the totals plus the clientside data.
    IF jsonb_typeof(b->'lim') = 'array' THEN
      n := nkeys + (b->'lim'->>2)::bigint;
      IF n > (b->'lim'->>0)::bigint THEN
        RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'too_many_keys', DETAIL = n::text;
      END IF;
      n := nbytes + (b->'lim'->>3)::bigint;
      IF n > (b->'lim'->>1)::bigint THEN
        RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'session_too_large', DETAIL = n::text;
      END IF;
    END IF;

    -- 7. The session's row: its expiry and totals, or gone with its last key.
    IF nkeys > 0 THEN
      UPDATE gimlet_sessions
        SET expires = (b->>'exp')::bigint, key_count = nkeys, byte_count = nbytes, tag = (b->>'tag')::bigint
        WHERE id = sid;
    ELSE
      DELETE FROM gimlet_sessions WHERE id = sid;
    END IF;
  END IF;

  -- 8. Ended ids, and a Regenerate's forward.
  FOR kv IN SELECT jsonb_array_elements(b->'end') LOOP
    INSERT INTO gimlet_marks (id, ended_until) VALUES (kv->>0, (kv->>1)::bigint)
      ON CONFLICT (id) DO UPDATE SET ended_until = EXCLUDED.ended_until;
  END LOOP;
  IF src IS NOT NULL AND jsonb_typeof(b->'fwd') = 'array' THEN
    INSERT INTO gimlet_marks (id, forward, forward_until)
      VALUES (src, b->'fwd'->>0, (b->'fwd'->>1)::bigint)
      ON CONFLICT (id) DO UPDATE SET forward = EXCLUDED.forward,
                                     forward_until = EXCLUDED.forward_until;
  END IF;

  -- 9. Users' indexes (locked in step 0), with the semantics of
  -- store::join_index.
  FOR u IN SELECT jsonb_array_elements(b->'users') LOOP
    IF u->>'op' = 'leave' THEN
      DELETE FROM gimlet_users WHERE uh = u->>'user' AND id = u->>'id';
      CONTINUE;
    END IF;
    IF u->>'replaces' IS NOT NULL THEN
      DELETE FROM gimlet_users WHERE uh = u->>'user' AND id = u->>'replaces';
    END IF;
    INSERT INTO gimlet_users (uh, id, created, expires, entry)
      VALUES (u->>'user', u->>'id', (u->>'created')::bigint, (u->>'expires')::bigint, u->>'entry')
      ON CONFLICT (uh, id) DO UPDATE SET created = EXCLUDED.created,
        expires = EXCLUDED.expires, entry = EXCLUDED.entry;
    DELETE FROM gimlet_users g WHERE g.uh = u->>'user' AND g.id <> u->>'id'
      AND (g.expires <= t OR EXISTS (SELECT 1 FROM gimlet_marks m
                                     WHERE m.id = g.id AND m.ended_until > t));
    IF u->>'max' IS NOT NULL THEN
      SELECT count(*) INTO n FROM gimlet_users WHERE uh = u->>'user';
      IF n > (u->>'max')::bigint THEN
        -- Left in the index until the gateway has ended them.
        evicted := evicted || ARRAY(
          SELECT g.entry FROM gimlet_users g WHERE g.uh = u->>'user' AND g.id <> u->>'id'
            ORDER BY g.created, g.id COLLATE "C" LIMIT n - (u->>'max')::bigint);
      END IF;
    END IF;
  END LOOP;
  RETURN ARRAY['ok'] || evicted;
END
$fn$;

-- End sessions (log out everywhere, max_per_user): keys and forwards go,
-- each id is remembered as ended until its expiry, the user's index drops it.
-- `ids` sorted by the caller (the locks of gimlet_write_v1, same order).
CREATE OR REPLACE FUNCTION gimlet_end_v1(ids text[], untils bigint[], who text) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  v text;
BEGIN
  FOREACH v IN ARRAY ids LOOP
    PERFORM pg_advisory_xact_lock(hashtextextended('gimlet:' || v, 0));
  END LOOP;
  IF who IS NOT NULL THEN
    PERFORM pg_advisory_xact_lock(hashtextextended('gimlet_users:' || who, 0));
  END IF;
  DELETE FROM gimlet_sessions WHERE id = ANY(ids);
  DELETE FROM gimlet_data WHERE id = ANY(ids);
  INSERT INTO gimlet_marks (id, ended_until)
    SELECT DISTINCT ON (e.id) e.id, e.until FROM unnest(ids, untils) AS e(id, until)
    ON CONFLICT (id) DO UPDATE SET ended_until = EXCLUDED.ended_until,
                                   forward = NULL, forward_until = NULL;
  IF who IS NOT NULL THEN
    DELETE FROM gimlet_users WHERE uh = who AND id = ANY(ids);
  END IF;
END
$fn$;

-- One bounded cleanup batch: expired sessions with their keys, marks past
-- their time, users' index entries past their session's expiry. Sessions
-- being written are skipped (their writer has them locked). Returns the
-- sessions deleted and the most rows any of the three deletes took (the
-- caller goes on while that is a whole batch).
CREATE OR REPLACE FUNCTION gimlet_cleanup_v1(lim int) RETURNS bigint[]
LANGUAGE plpgsql AS $fn$
DECLARE
  t bigint := gimlet_now();
  n bigint;
  most bigint;
  k bigint;
BEGIN
  WITH gone AS (
    DELETE FROM gimlet_sessions WHERE id IN (
      SELECT id FROM gimlet_sessions WHERE expires <= t
        ORDER BY expires LIMIT lim FOR UPDATE SKIP LOCKED)
    RETURNING id
  ), data_gone AS (
    DELETE FROM gimlet_data WHERE id IN (SELECT id FROM gone)
  )
  SELECT count(*) INTO n FROM gone;
  most := n;
  -- The expiry again in the outer WHERE: a row refreshed meanwhile stays.
  DELETE FROM gimlet_marks WHERE id IN (
    SELECT id FROM gimlet_marks
      WHERE greatest(coalesce(ended_until, 0), coalesce(forward_until, 0)) <= t LIMIT lim)
    AND greatest(coalesce(ended_until, 0), coalesce(forward_until, 0)) <= t;
  GET DIAGNOSTICS k = ROW_COUNT;
  most := greatest(most, k);
  DELETE FROM gimlet_users WHERE (uh, id) IN (
    SELECT uh, id FROM gimlet_users WHERE expires <= t LIMIT lim)
    AND expires <= t;
  GET DIAGNOSTICS k = ROW_COUNT;
  RETURN ARRAY[n, greatest(most, k)];
END
$fn$;

COMMIT;
