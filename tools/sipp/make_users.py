#!/usr/bin/env python3
"""Write a sipp injection CSV of N users to stdout.

    python3 tools/sipp/make_users.py 100 > users.csv                  # user1; ... user100;
    python3 tools/sipp/make_users.py 100 127.0.0.1 5070 > contacts.csv  # user1;127.0.0.1;5070;

The first form feeds store_uac.xml (field0 = user); the second feeds
register_uac.xml (field1/field2 = host and port of the message_uas.xml UAS).
"""

from __future__ import annotations

import argparse
import sys


def csv_lines(count: int, host: str | None = None, port: int | None = None) -> list[str]:
    """The CSV lines: the SEQUENTIAL header, then one line per user."""
    extra = f"{host};{port};" if host is not None else ""
    return ["SEQUENTIAL", *(f"user{i};{extra}" for i in range(1, count + 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, help="number of users (user1..userN)")
    parser.add_argument("host", nargs="?", help="contact host for register_uac.xml")
    parser.add_argument("port", nargs="?", type=int, help="contact port for register_uac.xml")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("count must be >= 1")
    if (args.host is None) != (args.port is None):
        parser.error("give both host and port, or neither")
    sys.stdout.write("\n".join(csv_lines(args.count, args.host, args.port)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
