"""Issue credentials for a deployment.

``python -m shared.issue token --name billing-bot --scope agent:run``
    prints a new bearer token (give it to the caller) and the static-key entry (its SHA-256,
    never the token) for the service's ``auth.static_keys``.
``python -m shared.issue certs --out certs/ --service orchestrator=orchestrator.agentmesh.svc``
    writes a CA (ca.crt, ca.key) and a certificate + key per service, valid as server and
    client (mTLS), with the given DNS names / IPs as subject alternative names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.auth import ALL_SCOPES, hash_token, new_token
from shared.pki import CertificateAuthority


def _token(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.scope) - ALL_SCOPES)
    if unknown:
        print(f"unknown scopes: {', '.join(unknown)} (known: {', '.join(sorted(ALL_SCOPES))})")
        return 2
    token = new_token()
    entry = {"name": args.name, "sha256": hash_token(token), "scopes": sorted(set(args.scope))}
    print(f"token (hand to the caller, shown once): {token}")
    print("static key entry (auth.static_keys in the service's config):")
    print(json.dumps(entry, indent=2))
    return 0


def _certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    ca = CertificateAuthority.create(days=args.ca_days)
    ca.write(out, "ca")
    for item in args.service:
        name, _, alt = item.partition("=")
        names = [n for n in alt.split(",") if n] or [name]
        cert, key = ca.issue(name, names, days=args.days).write(out, name)
        print(f"{name}: {cert} {key} (names: {', '.join(names)})")
    print(f"CA: {out / 'ca.crt'} (keep {out / 'ca.key'} offline)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.issue")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="a new static bearer token and its config entry")
    token.add_argument("--name", required=True)
    token.add_argument("--scope", action="append", default=[], required=True)
    certs = sub.add_parser("certs", help="a CA and one mTLS certificate per service")
    certs.add_argument("--out", required=True)
    certs.add_argument(
        "--service", action="append", required=True, help="NAME[=dns-or-ip,dns-or-ip...]"
    )
    certs.add_argument("--days", type=int, default=90)
    certs.add_argument("--ca-days", type=int, default=365)
    args = parser.parse_args(argv)
    return _token(args) if args.command == "token" else _certs(args)


if __name__ == "__main__":
    sys.exit(main())
