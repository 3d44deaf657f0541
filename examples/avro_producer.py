#!/usr/bin/env python3
"""Publishes Avro envelopes the way the services publish JSON today, for eventpipe's dispatcher.

It uses what a Python service would: confluent-kafka's Producer with its AvroSerializer against
the schema registry (Confluent wire format: magic byte, schema id, Avro body). The envelope is
schemas/envelope.avsc; `payload.data` stays free-form, carried as JSON text (json.dumps).

    pip install "confluent-kafka[avro,schemaregistry]"
    eventpipe schemas register          # once: the subjects must exist (auto-register is off)
    python examples/avro_producer.py --topic task_in --action start_task --count 10

The key is the user id, as the services key their records; each record's data carries `seq`.
"""

import argparse
import datetime
import json
import os
import pathlib
import sys

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

REPO = pathlib.Path(__file__).resolve().parent.parent


def envelope(service: str, action: str, message: str, data: dict) -> dict:
    """The services' envelope; the timestamp as they write it: utcnow().isoformat()."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return {
        "service": service,
        "action": action,
        "payload": {"message": message, "timestamp": now.isoformat(), "data": json.dumps(data)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"))
    parser.add_argument(
        "--schema-registry-url",
        default=os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:18081/apis/ccompat/v7"),
    )
    parser.add_argument("--topic", default="task_in")
    parser.add_argument("--action", default="start_task")
    parser.add_argument("--service", default="lk")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--users", type=int, default=5, help="distinct user ids (record keys)")
    parser.add_argument("--schema", default=str(REPO / "schemas" / "envelope.avsc"))
    args = parser.parse_args()

    registry = SchemaRegistryClient({"url": args.schema_registry_url})
    serializer = AvroSerializer(
        registry,
        pathlib.Path(args.schema).read_text(),
        # The registered schema is the contract: a service writes with the subject's latest
        # version and never registers one itself (`eventpipe schemas register` does, checked).
        conf={"auto.register.schemas": False, "use.latest.version": True},
    )
    producer = Producer({"bootstrap.servers": args.bootstrap_servers, "acks": "all", "enable.idempotence": True})
    failures = []

    def delivered(error, message):
        if error is not None:
            failures.append(str(error))

    context = SerializationContext(args.topic, MessageField.VALUE)
    for seq in range(args.count):
        user_id = seq % args.users
        value = envelope(args.service, args.action, f"It is {args.action}", {"user_id": user_id, "seq": seq})
        producer.produce(
            args.topic,
            key=str(user_id).encode(),
            value=serializer(value, context),
            headers=[("service", args.service.encode()), ("action", args.action.encode())],
            on_delivery=delivered,
        )
        producer.poll(0)
    remaining = producer.flush(30)
    if failures or remaining:
        print(f"not delivered: {len(failures) + remaining} ({failures[:3]})", file=sys.stderr)
        return 1
    print(f"produced {args.count} Avro envelopes to {args.topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
