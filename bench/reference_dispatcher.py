"""BASELINE, not eventpipe: a dispatcher written the way the services' Python consumers are today.

confluent-kafka consumer with auto-commit, a HandlerFactory keyed by action, json.loads/dumps,
a produce per event with a poll. It exists only so `eventpipe-bench dispatch` can report
eventpipe's throughput next to what teams run now, on the same records, in the same run.
Usage: reference_dispatcher.py BOOTSTRAP INPUT_TOPIC OUTPUT_TOPIC GROUP_ID COUNT
Exits after producing COUNT outputs (or after 30 s without input).
"""

import datetime
import json
import sys
import time

from confluent_kafka import Consumer, Producer


class CreateUserHandler:
    def handle(self, envelope):
        return {"message": "User created", "data": envelope["payload"]["data"]}


class UpdateUserHandler:
    def handle(self, envelope):
        return {"message": "User updated", "data": envelope["payload"]["data"]}


class StartTaskHandler:
    def handle(self, envelope):
        return {"message": "Task started", "data": envelope["payload"]["data"]}


class HandlerFactory:
    handlers = {
        "create_user": CreateUserHandler,
        "update_user": UpdateUserHandler,
        "start_task": StartTaskHandler,
    }

    @classmethod
    def get_handler(cls, action):
        if action not in cls.handlers:
            raise ValueError(f"unknown action {action}")
        return cls.handlers[action]()


def main():
    bootstrap, input_topic, output_topic, group_id, count = sys.argv[1:6]
    count = int(count)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    consumer.subscribe([input_topic])
    produced = 0
    last_input = time.monotonic()
    while produced < count and time.monotonic() - last_input < 30:
        message = consumer.poll(0.1)
        if message is None or message.error():
            continue
        last_input = time.monotonic()
        envelope = json.loads(message.value())
        result = HandlerFactory.get_handler(envelope["action"]).handle(envelope)
        output = {
            "service": "reference-dispatcher",
            "action": envelope["action"],
            "payload": {
                "message": result["message"],
                "timestamp": datetime.datetime.utcnow().isoformat(),
                "data": result["data"],
            },
        }
        while True:
            try:
                producer.produce(output_topic, key=message.key(), value=json.dumps(output))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        produced += 1
    producer.flush(30)
    consumer.close()


if __name__ == "__main__":
    main()
