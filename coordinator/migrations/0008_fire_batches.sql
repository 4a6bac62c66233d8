-- A fire over a large fleet is materialised in batches, one per engine
-- tick, so that no tick holds the catalog for long. While a fire is
-- part-made, the schedule's mark (`evaluated_until`) stays where it was and
-- these say how far the ordered (fire time, target) list has been made,
-- and at what time the fire was first evaluated (the whole fire is planned
-- as of then, however many ticks it takes); all NULL between fires. They move in the transaction that inserts
-- the batch, so a restart (or another coordinator) goes on after the last
-- committed batch.
ALTER TABLE schedules ADD COLUMN fire_cursor_at INTEGER;
ALTER TABLE schedules ADD COLUMN fire_cursor_target TEXT;
ALTER TABLE schedules ADD COLUMN fire_cursor_now INTEGER;
