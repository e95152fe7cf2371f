"""Manage the API keys file: python -m server.keys {add NAME [--rate-per-minute N] | list | remove NAME} [--file PATH].

`add` prints the new key once, on stdout (KEY=$(python -m server.keys add alice)); only its SHA-256 is stored.
The server reads the file when it starts (--api-keys), so restart it after a change.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from server.auth import ApiKey, KeysFileError, hash_key, read_keys, write_keys


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file", default=os.environ.get("LANDERMT_API_KEYS"),
                        help="the keys file (default: $LANDERMT_API_KEYS)")
    parser = argparse.ArgumentParser(prog="python -m server.keys",
                                     description="Manage the server's API keys file (it stores only key hashes).")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", parents=[common], help="create a key, print it once, store its hash")
    add.add_argument("name")
    add.add_argument("--rate-per-minute", type=positive_int, default=60, help="(default: 60)")
    commands.add_parser("list", parents=[common], help="names and rates (keys cannot be shown: only hashes are kept)")
    remove = commands.add_parser("remove", parents=[common], help="delete a key")
    remove.add_argument("name")
    args = parser.parse_args(argv)
    if not args.file:
        parser.error("no keys file: pass --file PATH or set LANDERMT_API_KEYS")
    path = Path(args.file)
    try:
        run(args, path)
    except KeysFileError as error:
        raise SystemExit(f"error: {error}") from None


def run(args: argparse.Namespace, path: Path) -> None:
    if args.command == "add":
        keys = read_keys(path) if path.exists() else []
        if not args.name.strip():
            raise SystemExit("error: the key name is empty")
        if args.name in {key.name for key in keys}:
            raise SystemExit(f"error: key {args.name!r} is already in {path}; remove it first to replace it")
        key = secrets.token_urlsafe(32)
        write_keys(path, [*keys, ApiKey(args.name, hash_key(key), args.rate_per_minute)])
        print(key)
        print(f"added key {args.name!r} ({args.rate_per_minute} requests per minute) to {path}; "
              "the key is shown only this once", file=sys.stderr)
    elif args.command == "list":
        keys = read_keys(path)
        for key in keys:
            print(f"{key.name}\t{key.rate_per_minute} per minute")
        if not keys:
            print(f"no keys in {path}", file=sys.stderr)
    else:
        keys = read_keys(path)
        if args.name not in {key.name for key in keys}:
            names = ", ".join(key.name for key in keys) or "none"
            raise SystemExit(f"error: no key {args.name!r} in {path} (keys: {names})")
        write_keys(path, [key for key in keys if key.name != args.name])
        print(f"removed key {args.name!r} from {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
