-- Gimlet's SQL store, MySQL 8 / MariaDB 10.6+ (`gimlet migrate --print mysql`).
-- Statements end at a line holding only `//` (the mysql client: DELIMITER //).
-- The gateway creates the tables when missing and each routine when missing:
-- routine names carry a version, so a newer gateway brings new ones.
--
-- How the routines stay correct under concurrency: each transaction runs
-- at READ COMMITTED (no gap locks; every statement sees what was committed
-- before it) and first locks every session id it touches, then every user
-- whose index it changes, each in sorted order (the caller sorts), through
-- rows it upserts: the session's own row (a placeholder, expires 0 and no
-- keys, where it has none) and a row of gimlet_user_locks. Placeholders
-- and user-lock rows are deleted before the commit; nobody else ever sees
-- them. Writers of one session, a logout and a Regenerate therefore run
-- one after the other, each seeing what the others did. The clock is
-- inline (`UNIX_TIMESTAMP(NOW(3))`, the gateway sets time_zone UTC): a
-- stored function would need SUPER or log_bin_trust_function_creators
-- where binary logging is on.

CREATE TABLE IF NOT EXISTS gimlet_sessions (
  id         CHAR(32)    CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
  tag        BIGINT      NOT NULL,
  expires    BIGINT      NOT NULL,
  key_count  INT         NOT NULL,
  byte_count BIGINT      NOT NULL,
  KEY gimlet_sessions_expires (expires)
) ENGINE=InnoDB
//

CREATE TABLE IF NOT EXISTS gimlet_data (
  id    CHAR(32)    CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  ch    TINYINT     NOT NULL,
  name  VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  value LONGTEXT    CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  PRIMARY KEY (id, ch, name)
) ENGINE=InnoDB
//

CREATE TABLE IF NOT EXISTS gimlet_marks (
  id            CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
  ended_until   BIGINT,
  forward       TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
  forward_until BIGINT,
  until_at      BIGINT AS (GREATEST(COALESCE(ended_until, 0), COALESCE(forward_until, 0))) STORED,
  KEY gimlet_marks_until (until_at)
) ENGINE=InnoDB
//

CREATE TABLE IF NOT EXISTS gimlet_users (
  uh      CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  id      CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  created BIGINT   NOT NULL,
  expires BIGINT   NOT NULL,
  entry   TEXT     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  PRIMARY KEY (uh, id),
  KEY gimlet_users_expires (expires)
) ENGINE=InnoDB
//

CREATE TABLE IF NOT EXISTS gimlet_user_locks (
  uh CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY
) ENGINE=InnoDB
//

CREATE PROCEDURE gimlet_write_v1(IN b LONGTEXT CHARACTER SET utf8mb4)
MODIFIES SQL DATA
proc: BEGIN
  -- One response's write (the JSON of SqlStore::batch_json), all or
  -- nothing. Answers one row: ('ok', the JSON list of user-index entries
  -- session.max_per_user evicted) or (a refusal, its detail).
  DECLARE t BIGINT DEFAULT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED);
  DECLARE sid CHAR(32) CHARACTER SET ascii COLLATE ascii_bin DEFAULT JSON_VALUE(b, '$.id');
  DECLARE src CHAR(32) CHARACTER SET ascii COLLATE ascii_bin
    DEFAULT NULLIF(JSON_VALUE(b, '$.rename'), JSON_VALUE(b, '$.id'));
  DECLARE carried CHAR(32) CHARACTER SET ascii COLLATE ascii_bin DEFAULT JSON_VALUE(b, '$.carried');
  DECLARE gone CHAR(32) CHARACTER SET ascii COLLATE ascii_bin;
  DECLARE lid CHAR(32) CHARACTER SET ascii COLLATE ascii_bin;
  DECLARE nk BIGINT DEFAULT 0;
  DECLARE nb BIGINT DEFAULT 0;
  DECLARE s_exp BIGINT;
  DECLARE s_keys BIGINT;
  DECLARE s_bytes BIGINT;
  DECLARE o_exp BIGINT;
  DECLARE o_keys BIGINT;
  DECLARE c INT DEFAULT 0;
  DECLARE i INT;
  DECLARE w LONGTEXT CHARACTER SET utf8mb4;
  DECLARE vk VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin;
  DECLARE vv LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
  DECLARE vold LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
  DECLARE digits LONGTEXT CHARACTER SET utf8mb4;
  DECLARE cur DECIMAL(30, 0);
  DECLARE dk BIGINT;
  DECLARE db BIGINT;
  DECLARE u LONGTEXT CHARACTER SET utf8mb4;
  DECLARE v_uh CHAR(32) CHARACTER SET ascii COLLATE ascii_bin;
  DECLARE v_uid CHAR(32) CHARACTER SET ascii COLLATE ascii_bin;
  DECLARE v_rep CHAR(32) CHARACTER SET ascii COLLATE ascii_bin;
  DECLARE v_entry TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
  DECLARE n BIGINT;
  DECLARE done INT DEFAULT 0;
  DECLARE evicted LONGTEXT CHARACTER SET utf8mb4 DEFAULT '[]';
  DECLARE refused VARCHAR(32) DEFAULT NULL;
  DECLARE detail LONGTEXT CHARACTER SET utf8mb4 DEFAULT NULL;
  DECLARE oldest CURSOR FOR
    SELECT g.entry FROM gimlet_users g WHERE g.uh = v_uh AND g.id <> v_uid
      ORDER BY g.created, g.id LIMIT n;
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1;
  DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;

  SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
  START TRANSACTION;
  body: BEGIN
    -- 0. The locks: every id, then every user, in the caller's (sorted)
    -- order.
    SET i = 0;
    WHILE i < JSON_LENGTH(b, '$.locks') DO
      SET lid = JSON_VALUE(b, CONCAT('$.locks[', i, ']'));
      INSERT INTO gimlet_sessions (id, tag, expires, key_count, byte_count)
        VALUES (lid, JSON_VALUE(b, '$.tag'), 0, 0, 0)
        ON DUPLICATE KEY UPDATE id = id;
      SET i = i + 1;
    END WHILE;
    SET i = 0;
    WHILE i < JSON_LENGTH(b, '$.ulocks') DO
      SET v_uh = JSON_VALUE(b, CONCAT('$.ulocks[', i, ']'));
      INSERT INTO gimlet_user_locks (uh) VALUES (v_uh) ON DUPLICATE KEY UPDATE uh = uh;
      SET i = i + 1;
    END WHILE;

    -- 1. Refusals on the marks, before anything changes.
    IF JSON_VALUE(b, '$.cm') = 1 THEN
      SET vv = (SELECT m.forward FROM gimlet_marks m
                WHERE m.id = carried AND m.forward_until > t);
      IF vv IS NOT NULL THEN
        SET refused = 'session_moved', detail = vv;
        LEAVE body;
      END IF;
    END IF;
    IF JSON_VALUE(b, '$.ce') = 1 AND EXISTS (SELECT 1 FROM gimlet_marks m
        WHERE m.id = COALESCE(src, sid) AND m.ended_until > t) THEN
      SET refused = 'session_ended';
      LEAVE body;
    END IF;

    -- 2. Destroy.
    SET gone = JSON_VALUE(b, '$.destroy');
    IF gone IS NOT NULL THEN
      DELETE FROM gimlet_sessions WHERE id = gone;
      DELETE FROM gimlet_data WHERE id = gone;
    END IF;

    IF JSON_VALUE(b, '$.donly') = 0 THEN
      -- 3. The session's row (locked in step 0, made again if the Destroy
      -- above was of this id).
      INSERT INTO gimlet_sessions (id, tag, expires, key_count, byte_count)
        VALUES (sid, JSON_VALUE(b, '$.tag'), 0, 0, 0) ON DUPLICATE KEY UPDATE id = id;
      SELECT expires, key_count, byte_count INTO s_exp, s_keys, s_bytes
        FROM gimlet_sessions WHERE id = sid;
      IF s_exp > t THEN
        SET nk = s_keys, nb = s_bytes;
      ELSEIF s_keys > 0 THEN
        -- Expired, not yet cleaned up: it is gone, whatever comes next.
        DELETE FROM gimlet_data WHERE id = sid;
      END IF;

      -- 4. Regenerate: the old id's keys move (replacing this id's in the
      -- channels the old one holds), its row goes.
      IF src IS NOT NULL THEN
        SELECT MAX(expires), MAX(key_count) INTO o_exp, o_keys
          FROM gimlet_sessions WHERE id = src;
        IF o_exp IS NOT NULL THEN
          DELETE FROM gimlet_sessions WHERE id = src;
          IF o_exp > t AND o_keys > 0 THEN
            SET c = 0;
            WHILE c < 4 DO
              IF EXISTS (SELECT 1 FROM gimlet_data WHERE id = src AND ch = c) THEN
                DELETE FROM gimlet_data WHERE id = sid AND ch = c;
              END IF;
              SET c = c + 1;
            END WHILE;
            UPDATE gimlet_data SET id = sid WHERE id = src;
            SELECT COUNT(*), COALESCE(SUM(LENGTH(name) + LENGTH(value)), 0) INTO nk, nb
              FROM gimlet_data WHERE id = sid;
          ELSE
            DELETE FROM gimlet_data WHERE id = src;
          END IF;
        END IF;
      END IF;

      -- 5. Each channel: clear, delete, set, incr, in that order; the
      -- totals follow every key changed.
      SET c = 0;
      WHILE c < 4 DO
        SET w = JSON_EXTRACT(b, CONCAT('$.ch[', c, ']'));
        IF w IS NOT NULL AND JSON_TYPE(w) = 'OBJECT' THEN
          IF JSON_VALUE(w, '$.clear') = 1 THEN
            SELECT COUNT(*), COALESCE(SUM(LENGTH(name) + LENGTH(value)), 0) INTO dk, db
              FROM gimlet_data WHERE id = sid AND ch = c;
            DELETE FROM gimlet_data WHERE id = sid AND ch = c;
            SET nk = nk - dk, nb = nb - db;
          END IF;
          SET i = 0;
          WHILE i < JSON_LENGTH(w, '$.del') DO
            SET vk = JSON_VALUE(w, CONCAT('$.del[', i, ']'));
            SET vold = (SELECT value FROM gimlet_data WHERE id = sid AND ch = c AND name = vk);
            IF vold IS NOT NULL THEN
              DELETE FROM gimlet_data WHERE id = sid AND ch = c AND name = vk;
              SET nk = nk - 1, nb = nb - LENGTH(vk) - LENGTH(vold);
            END IF;
            SET i = i + 1;
          END WHILE;
          SET i = 0;
          WHILE i < JSON_LENGTH(w, '$.set') DO
            SET vk = JSON_VALUE(w, CONCAT('$.set[', i, '][0]'));
            -- JSON_UNQUOTE: a value of any length (JSON_VALUE stops at 512
            -- characters on MySQL).
            SET vv = JSON_UNQUOTE(JSON_EXTRACT(w, CONCAT('$.set[', i, '][1]')));
            SET vold = (SELECT value FROM gimlet_data WHERE id = sid AND ch = c AND name = vk);
            IF vold IS NOT NULL THEN
              SET nk = nk - 1, nb = nb - LENGTH(vk) - LENGTH(vold);
            END IF;
            INSERT INTO gimlet_data (id, ch, name, value) VALUES (sid, c, vk, vv)
              ON DUPLICATE KEY UPDATE value = VALUES(value);
            SET nk = nk + 1, nb = nb + LENGTH(vk) + LENGTH(vv);
            SET i = i + 1;
          END WHILE;
          SET i = 0;
          WHILE i < JSON_LENGTH(w, '$.incr') DO
            SET vk = JSON_VALUE(w, CONCAT('$.incr[', i, '][0]'));
            SET vold = (SELECT value FROM gimlet_data WHERE id = sid AND ch = c AND name = vk);
            IF vold IS NULL THEN
              SET cur = 0;
            ELSE
              -- ^-?[0-9]+$ within 64 bits, leading zeros allowed. The second
              -- test keeps out what a regex end anchor lets through before a
              -- final line break (PCRE: \n; MySQL's ICU: \r and others too).
              IF NOT (vold REGEXP '^-?[0-9]+$') OR vold REGEXP '[^-0-9]' THEN
                SET refused = 'not_integer', detail = vk;
                LEAVE body;
              END IF;
              SET digits = TRIM(LEADING '0' FROM IF(LEFT(vold, 1) = '-', SUBSTRING(vold, 2), vold));
              IF LENGTH(digits) > 19 THEN
                SET refused = 'not_integer', detail = vk;
                LEAVE body;
              END IF;
              SET cur = CAST(vold AS DECIMAL(30, 0));
              IF cur < -9223372036854775808 OR cur > 9223372036854775807 THEN
                SET refused = 'not_integer', detail = vk;
                LEAVE body;
              END IF;
            END IF;
            SET cur = cur + CAST(JSON_VALUE(w, CONCAT('$.incr[', i, '][1]')) AS DECIMAL(30, 0));
            IF cur < -9223372036854775808 OR cur > 9223372036854775807 THEN
              SET refused = 'overflow', detail = vk;
              LEAVE body;
            END IF;
            SET vv = CAST(cur AS CHAR);
            IF vold IS NOT NULL THEN
              SET nk = nk - 1, nb = nb - LENGTH(vk) - LENGTH(vold);
            END IF;
            INSERT INTO gimlet_data (id, ch, name, value) VALUES (sid, c, vk, vv)
              ON DUPLICATE KEY UPDATE value = VALUES(value);
            SET nk = nk + 1, nb = nb + LENGTH(vk) + LENGTH(vv);
            SET i = i + 1;
          END WHILE;
        END IF;
        SET c = c + 1;
      END WHILE;

      -- 6. The session limits, over the totals plus the clientside data.
      IF JSON_TYPE(JSON_EXTRACT(b, '$.lim')) = 'ARRAY' THEN
        SET n = nk + JSON_VALUE(b, '$.lim[2]');
        IF n > JSON_VALUE(b, '$.lim[0]') THEN
          SET refused = 'too_many_keys', detail = n;
          LEAVE body;
        END IF;
        SET n = nb + JSON_VALUE(b, '$.lim[3]');
        IF n > JSON_VALUE(b, '$.lim[1]') THEN
          SET refused = 'session_too_large', detail = n;
          LEAVE body;
        END IF;
      END IF;

      -- 7. The session's row: its expiry and totals, or gone with its last key.
      IF nk > 0 THEN
        UPDATE gimlet_sessions SET expires = JSON_VALUE(b, '$.exp'), key_count = nk,
          byte_count = nb, tag = JSON_VALUE(b, '$.tag') WHERE id = sid;
      ELSE
        DELETE FROM gimlet_sessions WHERE id = sid;
      END IF;
    END IF;

    -- 8. Ended ids, and a Regenerate's forward.
    SET i = 0;
    WHILE i < JSON_LENGTH(b, '$.end') DO
      SET lid = JSON_VALUE(b, CONCAT('$.end[', i, '][0]'));
      INSERT INTO gimlet_marks (id, ended_until)
        VALUES (lid, JSON_VALUE(b, CONCAT('$.end[', i, '][1]')))
        ON DUPLICATE KEY UPDATE ended_until = VALUES(ended_until);
      SET i = i + 1;
    END WHILE;
    IF src IS NOT NULL AND JSON_TYPE(JSON_EXTRACT(b, '$.fwd')) = 'ARRAY' THEN
      INSERT INTO gimlet_marks (id, forward, forward_until)
        VALUES (src, JSON_UNQUOTE(JSON_EXTRACT(b, '$.fwd[0]')), JSON_VALUE(b, '$.fwd[1]'))
        ON DUPLICATE KEY UPDATE forward = VALUES(forward), forward_until = VALUES(forward_until);
    END IF;

    -- 9. Users' indexes (locked in step 0), with the semantics of
    -- store::join_index.
    SET i = 0;
    WHILE i < JSON_LENGTH(b, '$.users') DO
      SET u = JSON_EXTRACT(b, CONCAT('$.users[', i, ']'));
      SET v_uh = JSON_VALUE(u, '$.user'), v_uid = JSON_VALUE(u, '$.id'),
          v_rep = JSON_VALUE(u, '$.replaces');
      IF JSON_VALUE(u, '$.op') = 'leave' THEN
        DELETE FROM gimlet_users WHERE uh = v_uh AND id = v_uid;
      ELSE
        IF v_rep IS NOT NULL THEN
          DELETE FROM gimlet_users WHERE uh = v_uh AND id = v_rep;
        END IF;
        INSERT INTO gimlet_users (uh, id, created, expires, entry)
          VALUES (v_uh, v_uid, JSON_VALUE(u, '$.created'), JSON_VALUE(u, '$.expires'),
                  JSON_UNQUOTE(JSON_EXTRACT(u, '$.entry')))
          ON DUPLICATE KEY UPDATE created = VALUES(created), expires = VALUES(expires),
                                  entry = VALUES(entry);
        DELETE FROM gimlet_users WHERE uh = v_uh AND id <> v_uid AND expires <= t;
        DELETE g FROM gimlet_users g JOIN gimlet_marks m ON m.id = g.id
          WHERE g.uh = v_uh AND g.id <> v_uid AND m.ended_until > t;
        IF JSON_VALUE(u, '$.max') IS NOT NULL THEN
          SELECT COUNT(*) INTO n FROM gimlet_users WHERE uh = v_uh;
          IF n > JSON_VALUE(u, '$.max') THEN
            -- The oldest others, left in the index until the gateway has
            -- ended them.
            SET n = n - JSON_VALUE(u, '$.max'), done = 0;
            OPEN oldest;
            pick: LOOP
              FETCH oldest INTO v_entry;
              IF done = 1 THEN
                LEAVE pick;
              END IF;
              SET evicted = JSON_ARRAY_APPEND(evicted, '$', v_entry);
            END LOOP;
            CLOSE oldest;
            SET done = 0;
          END IF;
        END IF;
      END IF;
      SET i = i + 1;
    END WHILE;
  END body;

  IF refused IS NOT NULL THEN
    ROLLBACK;
    SELECT refused, detail;
  ELSE
    -- The placeholders and user locks go: nobody else ever sees them.
    SET i = 0;
    WHILE i < JSON_LENGTH(b, '$.locks') DO
      SET lid = JSON_VALUE(b, CONCAT('$.locks[', i, ']'));
      DELETE FROM gimlet_sessions WHERE id = lid AND key_count = 0;
      SET i = i + 1;
    END WHILE;
    SET i = 0;
    WHILE i < JSON_LENGTH(b, '$.ulocks') DO
      SET v_uh = JSON_VALUE(b, CONCAT('$.ulocks[', i, ']'));
      DELETE FROM gimlet_user_locks WHERE uh = v_uh;
      SET i = i + 1;
    END WHILE;
    COMMIT;
    SELECT 'ok', evicted;
  END IF;
END
//

CREATE PROCEDURE gimlet_end_v1(IN e LONGTEXT CHARACTER SET utf8mb4,
                               IN who CHAR(32) CHARACTER SET ascii COLLATE ascii_bin)
MODIFIES SQL DATA
BEGIN
  -- End sessions ([[id, until], ...], sorted by the caller): keys and
  -- forwards go, each id is remembered as ended until its expiry, the
  -- user's index drops it. The locks of gimlet_write_v1, same order.
  DECLARE i INT DEFAULT 0;
  DECLARE v_id CHAR(32) CHARACTER SET ascii COLLATE ascii_bin;
  DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
  SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
  START TRANSACTION;
  WHILE i < JSON_LENGTH(e) DO
    SET v_id = JSON_VALUE(e, CONCAT('$[', i, '][0]'));
    INSERT INTO gimlet_sessions (id, tag, expires, key_count, byte_count)
      VALUES (v_id, 0, 0, 0, 0) ON DUPLICATE KEY UPDATE id = id;
    SET i = i + 1;
  END WHILE;
  IF who IS NOT NULL THEN
    INSERT INTO gimlet_user_locks (uh) VALUES (who) ON DUPLICATE KEY UPDATE uh = uh;
  END IF;
  SET i = 0;
  WHILE i < JSON_LENGTH(e) DO
    SET v_id = JSON_VALUE(e, CONCAT('$[', i, '][0]'));
    DELETE FROM gimlet_sessions WHERE id = v_id;
    DELETE FROM gimlet_data WHERE id = v_id;
    INSERT INTO gimlet_marks (id, ended_until, forward, forward_until)
      VALUES (v_id, JSON_VALUE(e, CONCAT('$[', i, '][1]')), NULL, NULL)
      ON DUPLICATE KEY UPDATE ended_until = VALUES(ended_until), forward = NULL,
                              forward_until = NULL;
    IF who IS NOT NULL THEN
      DELETE FROM gimlet_users WHERE uh = who AND id = v_id;
    END IF;
    SET i = i + 1;
  END WHILE;
  IF who IS NOT NULL THEN
    DELETE FROM gimlet_user_locks WHERE uh = who;
  END IF;
  COMMIT;
END
//

CREATE PROCEDURE gimlet_cleanup_v1(IN lim INT)
MODIFIES SQL DATA
BEGIN
  -- One bounded cleanup batch: expired sessions with their keys (sessions
  -- being written are skipped: their writer holds them), marks past their
  -- time, users' index entries past their session's expiry. Answers the
  -- sessions deleted and the most rows any of the three deletes took (the
  -- caller goes on while that is a whole batch).
  DECLARE t BIGINT DEFAULT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED);
  DECLARE n BIGINT DEFAULT 0;
  DECLARE most BIGINT DEFAULT 0;
  DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
  CREATE TEMPORARY TABLE IF NOT EXISTS gimlet_gone (
    id CHAR(32) CHARACTER SET ascii COLLATE ascii_bin PRIMARY KEY
  ) ENGINE = MEMORY;
  DELETE FROM gimlet_gone;
  SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
  START TRANSACTION;
  INSERT INTO gimlet_gone SELECT id FROM gimlet_sessions WHERE expires <= t
    ORDER BY expires LIMIT lim FOR UPDATE SKIP LOCKED;
  SET n = ROW_COUNT();
  DELETE d FROM gimlet_data d JOIN gimlet_gone g ON g.id = d.id;
  DELETE s FROM gimlet_sessions s JOIN gimlet_gone g ON g.id = s.id;
  COMMIT;
  SET most = n;
  DELETE FROM gimlet_marks WHERE until_at <= t LIMIT lim;
  SET most = GREATEST(most, ROW_COUNT());
  DELETE FROM gimlet_users WHERE expires <= t LIMIT lim;
  SET most = GREATEST(most, ROW_COUNT());
  SELECT n, most;
END
//
