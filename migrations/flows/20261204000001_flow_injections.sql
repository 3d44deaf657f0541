-- History injection: a pause may carry a selection of the event store (JSON: filters, last,
-- since, until) that each gateway stream it holds delivers, marked replay, before its held events.
ALTER TABLE flow_pauses ADD COLUMN inject text;
