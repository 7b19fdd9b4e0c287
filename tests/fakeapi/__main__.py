"""Run the fake API server standalone, for kubectl, Helm or a controller by hand::

    python -m tests.fakeapi serve --port 6443 --kubeconfig /tmp/harness.kubeconfig
    KUBECONFIG=/tmp/harness.kubeconfig kubectl get alp

It serves TLS with a CA generated at start (embedded in the kubeconfig, which logs in as the admin),
loads the project's CRDs (``--crds`` to choose others) and, with ``--rbac FILE``, RBAC documents whose
ServiceAccounts get tokens (``--token-for NS/NAME`` prints one). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import threading

from tests.fakeapi import apiserver, rbac

REPO = pathlib.Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakeapi", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve until interrupted")
    serve.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free one)")
    serve.add_argument("--kubeconfig", type=pathlib.Path, required=True, help="where to write the admin kubeconfig")
    serve.add_argument("--crds", type=pathlib.Path, action="append", help="CRD file or folder (repeatable)")
    serve.add_argument("--rbac", type=pathlib.Path, action="append", default=[], help="RBAC YAML (repeatable)")
    serve.add_argument("--token-for", action="append", default=[], metavar="NS/NAME", help="print an SA's token")
    serve.add_argument("--plain-http", action="store_true", help="no TLS (kubectl then sends no token)")
    args = parser.parse_args(argv)
    documents = rbac.load_documents(*args.rbac) if args.rbac else []
    crds = args.crds or [REPO / "crds"]
    tls = not args.plain_http
    server = apiserver.ApiServer(crds, documents, port=args.port, tls=tls, default_field_validation="Warn")
    server.start()
    server.write_kubeconfig(args.kubeconfig)
    print(f"serving {server.url}; kubeconfig {args.kubeconfig}", flush=True)
    for account in args.token_for:
        namespace, _, name = account.partition("/")
        print(f"token {account}: {server.token_for(namespace, name)}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
