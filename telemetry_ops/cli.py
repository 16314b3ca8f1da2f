"""`rubrix-telemetry`: run the demo, the Rubrix server with hooks, the audit collector,
preview what would be sent, check the pipeline's status, and serve its figures to Prometheus.

Workers and Flower are started with Celery's own commands (`celery -A tasks worker`,
`celery -A tasks flower`), which operators already know.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from telemetry_core.settings import ConfigurationError, Settings, load_settings

log = logging.getLogger("rubrix-telemetry")

PROG = "rubrix-telemetry"
DEFAULT_SERVER_PORT = 6900
DEFAULT_COLLECTOR_PORT = 6970
DEFAULT_METRICS_PORT = 6971  # telemetry_ops.metrics.DEFAULT_METRICS_PORT: that module needs prometheus_client


class CommandFailed(Exception):
    """Ends a command with one clear line on stderr and exit code 1."""


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr and exit code 1, like every other mistake
    (argparse's own: the usage banner and exit code 2); `--help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: {message} (see --help)\n")


def port_number(raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {raw!r}")
    return port


def _version() -> str:
    try:
        return importlib.metadata.version("rubrix-telemetry")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _check_can_listen(host: str, port: int) -> None:
    from rubrix_hooks.server import listen_problem

    problem = listen_problem(host, port)
    if problem:
        raise CommandFailed(problem)


def _check_can_append(path: Path) -> None:
    """Checked at start: a collector that cannot keep what it receives must not accept it."""
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        raise CommandFailed(f"cannot write --out {path}: {error.strerror}") from None


def cmd_collector(args: argparse.Namespace) -> int:
    from telemetry_ops.collector import Collector

    if args.out is not None:
        _check_can_append(args.out)
    _check_can_listen(args.host, args.port)
    try:
        # Keeps no request: it runs for weeks (compose's `audit` profile); what it received
        # is in its log and the --out file.
        collector = Collector(host=args.host, port=args.port, out=args.out, keep_last=0)
    except OSError as error:
        raise CommandFailed(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    where = f", appending messages to {args.out}" if args.out else ""
    log.info("collector listening on %s (POST /v1/batch, /v1/track)%s", collector.url, where)
    log.info("point the workers at it: export RUBRIX_TELEMETRY_ENDPOINT=%s", collector.url)
    try:
        collector.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        collector.stop()
    return 0


def _settings_with_a_clear_switch() -> Settings:
    """The settings, or CommandFailed with the one line that says a switch value was not
    understood: telemetry is then off, and the operator should hear it, not read "off"."""
    settings = load_settings()
    if settings.switch_error:
        raise CommandFailed(settings.switch_error)
    return settings


def cmd_preview(args: argparse.Namespace) -> int:
    from telemetry_ops.preview import preview

    settings = _settings_with_a_clear_switch()
    print(json.dumps(preview(settings), indent=2, ensure_ascii=False))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from rubrix_hooks.rubrix_patch import RubrixNotInstalled
    from rubrix_hooks.server import run_server

    settings = load_settings()
    _check_can_listen(args.host, args.port)
    try:
        run_server(settings, args.host, args.port, example=args.example)
    except RubrixNotInstalled as error:
        raise CommandFailed(f"{error} (or pass --example to serve the example app)") from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from telemetry_ops.demo import DemoFailed, run_demo
    except ModuleNotFoundError as error:
        if error.name != "telemetry_ops.demo":
            raise
        # The Docker images leave the demo out: it starts a whole stack of its own.
        raise CommandFailed("the demo is not installed here (the Docker images leave it out): run it from a "
                            "checkout with `pip install -e \".[server]\" && rubrix-telemetry demo`") from None

    try:
        return run_demo(load_settings(), server_kind=args.server, keep_running=args.keep_running, port=args.port,
                        collector_port=args.collector_port)
    except DemoFailed as error:
        raise CommandFailed(f"demo failed: {error}") from None


def cmd_status(args: argparse.Namespace) -> int:
    from telemetry_ops.status import run_status

    _settings_with_a_clear_switch()
    return run_status(json_output=args.json)


def cmd_metrics(args: argparse.Namespace) -> int:
    try:
        from telemetry_ops.metrics import serve_metrics
    except ModuleNotFoundError as error:
        if error.name != "prometheus_client":
            raise
        raise CommandFailed("prometheus_client is not installed: pip install \"rubrix-telemetry[metrics]\"") from None

    settings = _settings_with_a_clear_switch()
    _check_can_listen(args.host, args.port)
    try:
        serve_metrics(settings, args.host, args.port)
    except OSError as error:
        raise CommandFailed(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Anonymous Rubrix telemetry through Celery workers. "
                    "Configuration comes from the environment (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # Accepted after the command too; SUPPRESS keeps a command without it from resetting
    # what was given before the command.
    verbose = OneLineParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[verbose], **kwargs)

    def listen_options(sub: argparse.ArgumentParser, default_port: int) -> None:
        sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
        sub.add_argument("--port", type=port_number, default=default_port,
                         help="port to listen on (default: %(default)s)")

    demo = command(
        "demo", help="run the whole pipeline locally and print what leaves the server",
        description="Starts a local collector and a server with the hooks (the real Rubrix when installed and its "
                    "Elasticsearch answers, else the example app), which starts its Celery worker on the embedded "
                    "on-disk queue as any server does, sends five realistic requests (one event each), prints "
                    "the events exactly as the collector received them, then stops everything.")
    demo.add_argument("--server", choices=["auto", "rubrix", "example"], default="auto",
                      help="which server to run (default: %(default)s)")
    demo.add_argument("--port", type=port_number, default=DEFAULT_SERVER_PORT,
                      help="server port (default: %(default)s)")
    demo.add_argument("--collector-port", type=port_number, default=0,
                      help="collector port (default: any free port)")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave server, worker and collector running until Ctrl-C")
    demo.set_defaults(run=cmd_demo)

    server = command(
        "server", help="run the Rubrix server with the telemetry hooks installed",
        description="Runs the real Rubrix app (rubrix.server.server:app) under uvicorn with rubrix_hooks "
                    "installed by patch_rubrix(), or with --example the example app with Rubrix's endpoints.")
    listen_options(server, DEFAULT_SERVER_PORT)
    server.add_argument("--example", action="store_true",
                        help="serve the example app instead of Rubrix (no Rubrix or Elasticsearch needed)")
    server.set_defaults(run=cmd_server)

    collector = command(
        "collector", help="run a local Segment-compatible backend that records what is sent",
        description="A local Segment-compatible backend (POST /v1/batch and /v1/track) that logs a line "
                    "per batch and, with --out, appends every message to a JSONL file. Point "
                    "RUBRIX_TELEMETRY_ENDPOINT at it to audit what leaves your server.")
    listen_options(collector, DEFAULT_COLLECTOR_PORT)
    collector.add_argument("--out", type=Path,
                           help="JSONL file to append every received message to (checked at start)")
    collector.set_defaults(run=cmd_collector)

    preview = command(
        "preview", help="print the platform data and one example of each event, exactly as sent",
        description="Prints whether telemetry is on and which variable decided, the platform data this "
                    "machine would attach, the deployment id the workers send (on Redis and RabbitMQ read "
                    "from the broker), and one example of each event exactly as it would be sent. "
                    "Only reads: creates neither the installation id nor the queue.")
    preview.set_defaults(run=cmd_preview)

    status = command(
        "status", help="ask the broker and the workers whether events can flow",
        description="Asks the broker (queue depth, delivery counts) and every worker listening on it (Celery "
                    "remote control: each answers with its queues, its telemetry switch, endpoint, whether a "
                    "write key is set, concurrency and versions). Healthy, exit code 0: the broker answers, "
                    "a worker consumes the queue and none of those workers is unable to deliver. Otherwise "
                    "exit code 1 with one line per problem on stderr. Answers within 5 seconds.")
    status.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    status.set_defaults(run=cmd_status)

    metrics = command(
        "metrics", help="serve the deployment's telemetry figures to Prometheus on /metrics",
        description="Serves /metrics in Prometheus' text format. Each scrape asks the broker and the workers "
                    "as `status` does, within the scrape's timeout (4 seconds at most): events delivered, "
                    "retried and dropped (by reason) deployment-wide, the backlog and its limit, whether the "
                    "broker answers, and the workers consuming the queue. Never the write key or a password.")
    listen_options(metrics, DEFAULT_METRICS_PORT)
    metrics.set_defaults(run=cmd_metrics)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (ConfigurationError, CommandFailed) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
