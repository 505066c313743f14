#!/usr/bin/env python3
"""A business system's own Kafka producer, not herald: writes send requests to herald.requests
with confluent-kafka (librdkafka 2.x), as docs/schemas/kafka-request.v1.json describes.

  kafka_produce.py requests --brokers B --app A --api-key K --template T \
      --receivers 50 --per-receiver 100 --prefix kuser-
      one record per message, keyed by receiver, `seq` in the variables and
      biz_id "<receiver>/<seq>"; a receiver's records are produced in seq order.
  kafka_produce.py raw --brokers B < lines
      each stdin line is JSON {"key": str, "value": str}: produced as is.

Prints the number of records the broker acknowledged; exits non-zero if any failed.
"""
import argparse
import json
import sys

from confluent_kafka import Producer

TOPIC = "herald.requests"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["requests", "raw"])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--app")
    parser.add_argument("--api-key")
    parser.add_argument("--template", type=int)
    parser.add_argument("--receivers", type=int, default=50)
    parser.add_argument("--per-receiver", type=int, default=100)
    parser.add_argument("--prefix", default="kuser-")
    args = parser.parse_args()

    producer = Producer({
        "bootstrap.servers": args.brokers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
    })
    acked = 0
    failed = []

    def report(err, _msg):
        nonlocal acked
        if err is None:
            acked += 1
        else:
            failed.append(str(err))

    def produce(key, value):
        while True:
            try:
                producer.produce(TOPIC, key=key, value=value, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)

    if args.mode == "requests":
        for seq in range(args.per_receiver):
            for r in range(args.receivers):
                receiver = f"{args.prefix}{r}"
                record = {
                    "v": 1,
                    "app": args.app,
                    "api_key": args.api_key,
                    "template_id": args.template,
                    "messages": [{
                        "receivers": [receiver],
                        "variables": {"seq": seq},
                        "biz_id": f"{receiver}/{seq}",
                    }],
                }
                produce(receiver.encode(), json.dumps(record).encode())
    else:
        for line in sys.stdin:
            if line.strip():
                item = json.loads(line)
                produce(item["key"].encode(), item["value"].encode())
    producer.flush(120)
    print(acked)
    if failed:
        print("\n".join(failed[:10]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
