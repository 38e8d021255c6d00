"""Reads a topic with Confluent's own client (confluent-kafka, its SchemaRegistryClient and
AvroDeserializer), nothing of Kafkify's: the values kafkifyctl tail prints are checked
against these by kafkifyctl/tests/ctl.rs.

Usage: read.py --brokers HOST:PORT --registry URL --topic T --count N
Prints one JSON object per record (partition, offset, key, value), read_committed, from the
beginning, until N records were read; exits 1 if they do not arrive within 30 s.
"""

import argparse
import datetime
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def plain(value):
    """fastavro's logical types back to their Avro encoding, as kafkifyctl prints them:
    timestamp-micros as microseconds since the epoch, uuid as its string."""
    if isinstance(value, datetime.datetime):
        return (value - EPOCH) // datetime.timedelta(microseconds=1)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--brokers", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--count", type=int, required=True)
    a = p.parse_args()
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": a.registry}))
    consumer = Consumer(
        {
            "bootstrap.servers": a.brokers,
            "group.id": "confluent-python-read",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    metadata = consumer.list_topics(a.topic, timeout=10)
    partitions = metadata.topics[a.topic].partitions
    consumer.assign([TopicPartition(a.topic, p, 0) for p in partitions])
    seen = 0
    deadline = time.time() + 30
    while seen < a.count:
        if time.time() > deadline:
            print(f"only {seen} of {a.count} records within 30 s", file=sys.stderr)
            sys.exit(1)
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            print(f"error: {msg.error()}", file=sys.stderr)
            sys.exit(1)
        value = deserialize(msg.value(), SerializationContext(msg.topic(), MessageField.VALUE))
        key = msg.key().decode() if msg.key() is not None else None
        print(
            json.dumps(
                {"partition": msg.partition(), "offset": msg.offset(), "key": key, "value": plain(value)}
            )
        )
        seen += 1
    consumer.close()


if __name__ == "__main__":
    main()
