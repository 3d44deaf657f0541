"""BASELINE, not eventpipe: an event store written the way the services' Python consumers would.

confluent-kafka consumer without auto-commit; per polled batch, psycopg `executemany` of an
INSERT into the same `events` table (idempotent on the coordinates, like the stage), a database
commit, then a synchronous offset commit. It exists only so `eventpipe-bench store` can report
eventpipe's throughput next to it, on the same records, in the same run.
Usage: reference_store.py BOOTSTRAP TOPIC GROUP_ID POSTGRES_URL COUNT
Prints `stored COUNT` once COUNT rows are committed (or exits 1 after 30 s without input), then
waits for standard input to close, so its CPU and its server's can be read while it still lives.
"""

import datetime
import json
import sys
import time

import psycopg
from confluent_kafka import Consumer

INSERT = (
    "INSERT INTO events (topic, kafka_partition, kafka_offset, kafka_time, event_time,"
    " service, action, key, headers, value, format)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, 'json')"
    " ON CONFLICT DO NOTHING"
)
BATCH = 1000


def event_time(envelope):
    try:
        text = envelope["payload"]["timestamp"]
        time_ = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError):
        return None
    return time_ if time_.tzinfo else time_.replace(tzinfo=datetime.timezone.utc)


def row(message):
    value = message.value().decode()
    envelope = json.loads(value)
    headers = [(name, raw.decode()) for name, raw in message.headers() or []]
    named = dict(headers)
    _, timestamp_ms = message.timestamp()
    return (
        message.topic(),
        message.partition(),
        message.offset(),
        datetime.datetime.fromtimestamp(timestamp_ms / 1000, datetime.timezone.utc),
        event_time(envelope),
        named.get("service") or envelope.get("service", ""),
        named.get("action") or envelope.get("action", ""),
        message.key(),
        json.dumps(headers) if headers else None,
        value,
    )


def main():
    bootstrap, topic, group_id, postgres_url, count = sys.argv[1:6]
    count = int(count)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    stored = 0
    last_input = time.monotonic()
    with psycopg.connect(postgres_url) as connection:
        while stored < count:
            if time.monotonic() - last_input > 30:
                print(f"no input for 30 s after {stored} rows", file=sys.stderr)
                sys.exit(1)
            messages = [m for m in consumer.consume(BATCH, 1.0) if not m.error()]
            if not messages:
                continue
            last_input = time.monotonic()
            with connection.cursor() as cursor:
                cursor.executemany(INSERT, [row(m) for m in messages])
            connection.commit()
            consumer.commit(asynchronous=False)
            stored += len(messages)
        print(f"stored {stored}", flush=True)
        sys.stdin.read()
    consumer.close()


if __name__ == "__main__":
    main()
