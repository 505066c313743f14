#!/usr/bin/env python3
"""A real SMTP server for herald's email tests: it accepts mail and writes it to a directory.

Usage:
    smtp_sink.py --dir DIR [--port PORT] [--transient REGEX] [--permanent REGEX] [--exit-on-eof]

It listens on 127.0.0.1:PORT (PORT 0, the default, picks a free port) and, once listening, prints
one line `READY <port>` on stdout, so a test can start it and learn the port without races.

Every message it accepts becomes two files in DIR, named by a sequence number:
  - `NNNN.eml`:  the message exactly as received (RFC 5322, as the client sent it in DATA);
  - `NNNN.json`: the envelope and the decoded message, written last (and atomically), so a reader
    that sees it also sees the .eml:
        {"mail_from", "rcpt_tos", "peer": "ip:port" of the client's TCP connection,
         "subject", "message_id", "from", "to", "content_type",
         "parts": [{"content_type", "content", "filename", "content_base64"}]}
    `parts` holds every leaf part: `content` is its body transfer-decoded to text (`null` for a
    part that is not text, such as a binary attachment), `filename` its Content-Disposition or
    Content-Type file name (`null` if none), and `content_base64` the base64 of its exact bytes
    after transfer decoding (before any charset decoding), so attachments can be compared
    byte for byte.

Parsing is done by Python's standard `email` package, so tests assert on decoded text
(quoted-printable, base64 and RFC 2047 headers undone) by a parser independent of the sender.

Error injection: a recipient matching --transient (a Python regex, searched) is answered
`451 4.3.0` (a transient failure); one matching --permanent is answered `550 5.1.1` (permanent).

--exit-on-eof makes the sink exit when its stdin closes, so it never outlives the test process
that started it, even if that process is killed.

Needs aiosmtpd (`pip install aiosmtpd`).
"""

import argparse
import asyncio
import base64
import email
import email.policy
import itertools
import json
import os
import re
import sys
import threading

try:
    from aiosmtpd.smtp import SMTP
except ImportError:
    sys.stderr.write("smtp_sink.py needs aiosmtpd: pip install aiosmtpd\n")
    sys.exit(3)


class Sink:
    """aiosmtpd handler: refuses recipients by pattern, writes accepted messages to a directory."""

    def __init__(self, directory, transient, permanent):
        self.directory = directory
        self.transient = re.compile(transient) if transient else None
        self.permanent = re.compile(permanent) if permanent else None
        self.seq = itertools.count(1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.transient and self.transient.search(address):
            return "451 4.3.0 Mailbox temporarily unavailable, try again later"
        if self.permanent and self.permanent.search(address):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content
        n = next(self.seq)
        base = os.path.join(self.directory, f"{n:04}")
        with open(base + ".eml", "wb") as f:
            f.write(raw)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "peer": "%s:%s" % tuple(session.peer[:2]),
        }
        record.update(decode(raw))
        tmp = base + ".json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, indent=2)
        os.replace(tmp, base + ".json")
        return "250 OK: queued as %04d" % n


def decode(raw):
    """The headers and leaf parts of a message, decoded to text."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        content = part.get_content()
        payload = part.get_payload(decode=True) or b""
        parts.append({
            "content_type": part.get_content_type(),
            "content": content if isinstance(content, str) else None,
            "filename": part.get_filename(),
            "content_base64": base64.b64encode(payload).decode("ascii"),
        })
    return {
        "subject": str(msg["subject"]) if msg["subject"] is not None else None,
        "message_id": str(msg["message-id"]) if msg["message-id"] is not None else None,
        "from": str(msg["from"]) if msg["from"] is not None else None,
        "to": str(msg["to"]) if msg["to"] is not None else None,
        "content_type": msg.get_content_type(),
        "list_unsubscribe": str(msg["list-unsubscribe"]) if msg["list-unsubscribe"] is not None else None,
        "list_unsubscribe_post": str(msg["list-unsubscribe-post"]) if msg["list-unsubscribe-post"] is not None else None,
        "parts": parts,
    }


async def serve(args):
    os.makedirs(args.dir, exist_ok=True)
    handler = Sink(args.dir, args.transient, args.permanent)
    loop = asyncio.get_running_loop()
    # A fixed hostname: the default (socket.getfqdn()) can stall on a DNS lookup.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="herald-smtp-sink", enable_SMTPUTF8=True),
        host="127.0.0.1",
        port=args.port,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


def exit_on_eof():
    sys.stdin.read()
    os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="where to write received messages")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--transient", help="regex: answer 451 to matching recipients")
    parser.add_argument("--permanent", help="regex: answer 550 to matching recipients")
    parser.add_argument("--exit-on-eof", action="store_true", help="exit when stdin closes")
    args = parser.parse_args()
    if args.exit_on_eof:
        threading.Thread(target=exit_on_eof, daemon=True).start()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
