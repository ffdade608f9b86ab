"""``distill serve``: run the online teacher endpoint (uvicorn, or Ray Serve with ``--ray``).

`register_serve(subparsers)` adds the subcommand; `teacher_service.cli.register` calls it.
Heavy imports (torch, ray, uvicorn) happen inside `run_serve`.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Serve a teacher's dense targets over HTTP for views that were not precomputed.

POST /v1/targets takes multipart/form-data (views = JSON list of view dicts, images = one
file per view, optional targets = cls,box,fpn,backbone or names like cls/p3) and answers
the label store's per-view encoding (application/vnd.distillery.targets) with the teacher
fingerprint digest in X-Teacher-Fingerprint. GET /v1/teacher, /healthz, /readyz, /metrics.

Every option can also come from the environment, as DISTILLERY_ and the option's name
in capitals with underscores (DISTILLERY_TEACHER, DISTILLERY_TOKEN, DISTILLERY_MAX_QUEUE,
DISTILLERY_BODY_TIMEOUT_S, ...; --no-auth is DISTILLERY_AUTH_DISABLED=1, --docs is
DISTILLERY_DOCS_ACCESS); command-line options win. A token is required unless --no-auth
is given with a loopback --host.

Hostile input is bounded: a body over --max-request-bytes, a text field (views, targets)
over --max-field-bytes or an image file over --max-image-bytes gets 413 while it is
read; an image whose header declares more than --max-image-pixels pixels, or other sides
than its view, gets 422 without being decoded; at most --decode-workers images are
decoded at once; a body not received within --body-timeout-s gets 408; beyond
--limit-concurrency connections and requests uvicorn answers 503; idle keep-alive
connections close after --timeout-keep-alive-s. Error answers name the first few
offenders and their count, never repeat the Authorization header, and the access log
shows query strings as <redacted>. /docs, /redoc and /openapi.json are off by default
on a non-loopback --host (--docs).

Ctrl-C or SIGTERM drains (without --ray): requests in flight are answered, new ones get
503 (problem "draining", Retry-After), then the server exits 130 (SIGINT) or 143 (SIGTERM);
a second signal stops at once.
"""

EPILOG = """\
examples:
  DISTILLERY_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \\
      distill serve --teacher runs/teacher/final.pt --host 0.0.0.0
  distill serve --teacher runs/teacher/final.pt --no-auth            # loopback only
  distill serve --teacher runs/teacher/final.pt --ray --address ray-head:6379 --replicas 2
"""


def register_serve(subparsers) -> None:
    """Add ``serve`` to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "serve",
        help="serve teacher targets over HTTP (FastAPI on uvicorn, or Ray Serve with --ray)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (env DISTILLERY_TEACHER)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; non-loopback needs a token)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument(
        "--token",
        help="bearer token clients must send; prefer env DISTILLERY_TOKEN (a command line is visible in ps)",
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="serve without a token (refused unless --host is loopback)"
    )
    parser.add_argument("--max-batch", type=int, help="most views per teacher forward pass (default 8)")
    parser.add_argument("--max-wait-ms", type=float, help="longest wait to fill a batch, in ms (default 5)")
    parser.add_argument(
        "--max-queue", type=int, help="most views waiting for a forward pass; beyond it 503 (default 64)"
    )
    parser.add_argument("--max-request-bytes", type=int, help="largest request body; beyond it 413 (default 64 MiB)")
    parser.add_argument("--max-field-bytes", type=int,
                        help="largest text field (views JSON, targets); beyond it 413 while reading (default 1 MiB)")
    parser.add_argument("--max-image-bytes", type=int,
                        help="largest image file of a request; beyond it 413 while reading (default 32 MiB)")
    parser.add_argument("--max-image-pixels", type=int,
                        help="most pixels of an uploaded image, read from its header before decoding; beyond it 422 "
                             "image-too-large (default 40000000)")
    parser.add_argument("--decode-workers", type=int,
                        help="threads decoding uploaded images: no more images are decoded at once (default 2)")
    parser.add_argument("--body-timeout-s", type=float,
                        help="the request body must arrive within this many seconds of the request's start; "
                             "else 408 and the connection is closed (default 60)")
    parser.add_argument("--limit-concurrency", type=int,
                        help="most connections and requests in flight; beyond it 503 (uvicorn; default 64)")
    parser.add_argument("--timeout-keep-alive-s", type=int,
                        help="close idle keep-alive connections after this many seconds (uvicorn; default 5)")
    parser.add_argument("--docs", choices=("open", "token", "off"),
                        help="/docs, /redoc, /openapi.json: open, behind the token, or off "
                             "(default: open on a loopback --host, off elsewhere)")
    parser.add_argument("--metrics-access", choices=("open", "token"),
                        help="/metrics without a token (open, the default) or only with it (token)")
    parser.add_argument("--device", help="torch device: auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16"), help="autocast as in precompute (default auto)"
    )
    parser.add_argument("--canvas", type=_canvas, help="store canvas HxW: views on HxW (landscape) or WxH (portrait) (default: the checkpoint's)")
    parser.add_argument(
        "--codec",
        action="append",
        type=_codec_override,
        metavar="GROUP=CODEC",
        help="codec override by target group, as given to the store (repeatable), e.g. fpn=int8-channel",
    )
    parser.add_argument("--torch-threads", type=int, help="intra-op threads of the forward pass on the CPU")
    parser.add_argument("--annotations", metavar="FILE",
                        help="COCO annotations whose categories the cls targets hold (the store's), mapped from the "
                             "teacher's classes by name as distill precompute does (default: the teacher's classes)")
    parser.add_argument("--class-map", metavar="FILE",
                        help="with --annotations: JSON of teacher class name -> dataset category name")
    parser.add_argument("--allow-missing-classes", action="store_true", default=None,
                        help="with --annotations: accept dataset categories the teacher lacks (left out of class distillation)")
    parser.add_argument("--ray", action="store_true", help="deploy as a Ray Serve application (FastAPI ingress)")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray; default 1)")
    parser.add_argument(
        "--address", help="Ray cluster to join, e.g. ray-head:6379 (with --ray; default: start a local one)"
    )
    parser.set_defaults(func=run_serve, _parser=parser)


_SETTING_ARGS = {
    "teacher": "teacher",
    "host": "host",
    "port": "port",
    "token": "token",
    "max_batch": "max_batch",
    "max_wait_ms": "max_wait_ms",
    "max_queue": "max_queue",
    "max_request_bytes": "max_request_bytes",
    "max_field_bytes": "max_field_bytes",
    "max_image_bytes": "max_image_bytes",
    "max_image_pixels": "max_image_pixels",
    "decode_workers": "decode_workers",
    "body_timeout_s": "body_timeout_s",
    "limit_concurrency": "limit_concurrency",
    "timeout_keep_alive_s": "timeout_keep_alive_s",
    "docs": "docs_access",
    "metrics_access": "metrics_access",
    "device": "device",
    "precision": "precision",
    "canvas": "canvas_hw",
    "torch_threads": "torch_threads",
    "annotations": "annotations",
    "class_map": "class_map",
    "allow_missing_classes": "allow_missing_classes",
}


def _canvas(text: str) -> tuple[int, int]:
    parts = text.lower().replace(" ", "").split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"--canvas expects HxW (e.g. 256x256). Got {text!r}.") from None
    if len(parts) > 2 or h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"--canvas expects HxW with positive sides. Got {text!r}.")
    return (h, w)


def _codec_override(text: str) -> tuple[str, str]:
    name, sep, codec = text.partition("=")
    if not sep or not name.strip() or not codec.strip():
        raise argparse.ArgumentTypeError(f"--codec expects GROUP=CODEC (e.g. fpn=int8-channel). Got {text!r}.")
    return (name.strip(), codec.strip())


def settings_from_args(args: argparse.Namespace):
    """`ServeSettings` from the environment, overridden by the options given on the command line."""
    from teacher_service.api.settings import ServeSettings

    overrides = {field: getattr(args, name) for name, field in _SETTING_ARGS.items() if getattr(args, name, None) is not None}
    if getattr(args, "codec", None):
        overrides["codecs"] = dict(args.codec)
    if getattr(args, "no_auth", False):
        overrides["auth_disabled"] = True
    if getattr(args, "verbose", False):
        overrides["log_level"] = "debug"
    return ServeSettings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    log = logging.getLogger("distill.serve")
    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ())) or "settings"
            message = str(item.get("msg", "")).removeprefix("Value error, ")
            if item.get("type") == "missing":
                message = f"required; pass --{where.replace('_', '-')} or set DISTILLERY_{where.upper()}"
            print(f"distill serve: {where}: {message}", file=sys.stderr)
        return EXIT_USAGE
    if not settings.teacher.is_file():
        print(f"distill serve: --teacher expects a checkpoint file. Got {str(settings.teacher)!r} (not found).", file=sys.stderr)
        return EXIT_USAGE
    if args.replicas < 1:
        print(f"distill serve: --replicas expects >= 1. Got {args.replicas}.", file=sys.stderr)
        return EXIT_USAGE
    from detcore.checkpoint import CheckpointError
    from detcore.classes import ClassMappingError
    from detcore.coco import AnnotationError
    from teacher_service.app import serve_class_mapping

    try:  # before the server starts, so that classes that do not map exit 2 with their names
        mapping = serve_class_mapping(settings)
    except (ClassMappingError, AnnotationError, CheckpointError) as error:
        print(f"distill serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    if mapping is not None:
        log.info("teacher classes mapped to the categories of %s:\n%s", settings.annotations, mapping.describe())
    if args.ray:
        from teacher_service.serve_deployment import deploy

        return deploy(settings, num_replicas=args.replicas, address=args.address)
    if args.address or args.replicas != 1:
        print("distill serve: --address and --replicas need --ray.", file=sys.stderr)
        return EXIT_USAGE
    from detcore.interrupt import Interrupted
    from teacher_service.app import create_app
    from teacher_service.drain import serve_until_drained

    log.info("serving %s on http://%s:%d (auth %s)", settings.teacher, settings.host, settings.port,
             "disabled" if settings.auth_disabled else "required")
    try:
        signum = serve_until_drained(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=10,
            limit_concurrency=settings.limit_concurrency,
            timeout_keep_alive=settings.timeout_keep_alive_s,
        )
    except SystemExit as stop:  # uvicorn exits with 3 when the lifespan (teacher load) fails
        if stop.code not in (0, None):
            print(f"distill serve: startup failed (uvicorn exit {stop.code}); see the log above.", file=sys.stderr)
            return EXIT_FAILURE
        raise
    if signum is not None:
        raise Interrupted(signum, "drained: the requests in flight were answered, later ones got 503")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m teacher_service.serve_cli ...``: the ``serve`` subcommand alone."""
    parser = argparse.ArgumentParser(prog="distill")
    register_serve(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from detcore.interrupt import Interrupted

    try:
        return args.func(args)
    except Interrupted as stop:
        return stop.report()


if __name__ == "__main__":
    sys.exit(main())
