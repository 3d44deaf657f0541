"""Records on Kafka topics, for scripts/demo: one line `TOPIC COUNT` per topic named on the
command line, COUNT being the sum over partitions of the high watermark (the end offset), i.e.
every record ever written and not yet removed by retention; -1 if the topic does not exist.
No consumer group is joined and nothing is committed.

    python offsets.py BOOTSTRAP_SERVERS TOPIC...
"""

import sys

from confluent_kafka import Consumer, KafkaException, TopicPartition


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    bootstrap, topics = sys.argv[1], sys.argv[2:]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            # Required by the client, never used: no subscribe, no commit.
            "group.id": "eventpipe-demo-offsets",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                print(f"{topic} -1")
                continue
            total = 0
            for partition in meta.partitions:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10, cached=False
                )
                total += max(high, 0)
            print(f"{topic} {total}")
    except KafkaException as error:
        print(f"offsets: {error}", file=sys.stderr)
        return 1
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
