"""`emotion-agent`: turns arguments into a config and calls the right piece. Every AgentError
becomes one line on stderr and an exit code; no traceback reaches the user."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module
from typing import Sequence

from agent import __version__
from agent.argtypes import Parser, name_part, plot_file, port, positive_int, positive_seconds
from agent.config import Config, load_config, redact_url, setting_location
from agent.errors import ConfigError, SourceError, flushed, interrupted, report_error

logger = logging.getLogger("agent")

FLUSH_TIMEOUT_S = 30.0


def _configure_logging(level: str) -> None:
    # Under systemd the journal adds its own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, force=True)
    logging.getLogger("agent.paho").setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="emotion-agent", description="Facial-expression events from a camera, published to MQTT.")
    parser.add_argument("--version", action="version", version=f"emotion-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the capture -> detect -> classify -> MQTT loop")
    run.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    run.add_argument("--source", help="camera index (0), video file, image file, or rtsp:// / http(s):// URL")
    run.add_argument("--show", action="store_true", help="open a preview window (q or Esc quits)")
    run.add_argument("--mqtt-host", help="broker host (overrides mqtt.host)")
    run.add_argument("--mqtt-port", type=port, help="broker port (overrides mqtt.port)")
    run.add_argument("--topic-prefix", help="root of every topic (overrides mqtt.topic_prefix)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="overrides log_level")
    run.add_argument("--realtime", action="store_true", help="pace a video file at its own frame rate")
    run.add_argument("--loop", action="store_true", help="start a video file over at its end (soak tests)")
    run.add_argument("--flush-timeout", type=positive_seconds, default=FLUSH_TIMEOUT_S, metavar="SECONDS",
                     help="at the end, wait this long for the broker to take every message (default %(default)s)")

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")

    _add_tool_commands(sub)
    return parser


def _add_tool_commands(sub) -> None:
    """The measuring tools' subcommands: their arguments are declared here, and their code (in
    agent.tools, with OpenCV) loads only when one of them is chosen, never for `run`."""
    p = sub.add_parser("eval", help="measure accuracy: emotions on a FER2013 folder, or faces on dlib XML")
    p.add_argument("target", metavar="DIR",
                   help="one folder per class, named as FER2013, CK+, KDEF or JAFFE name them (contempt is "
                        "skipped), or, with --faces, imglab XML file(s)/folder")
    p.add_argument("--faces", action="store_true", help="score the face detector against imglab boxes")
    p.add_argument("--margins", metavar="M,M,...",
                   help="detect each face, then classify crops at these margins (how the default was chosen); "
                        "write --margins=-0.1,0,0.1 when the first is negative")
    p.add_argument("--config", metavar="FILE", help="agent config whose models are measured")
    p.add_argument("--limit", type=positive_int, metavar="N", help="at most N images per class")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", metavar="FILE.png", type=plot_file,
                   help="draw the confusion matrix (needs matplotlib; .png, .pdf or .svg)")
    p.set_defaults(tool="eval_cli")

    p = sub.add_parser("bench", help="measure speed on a video, beside decode-only and the classic pipeline")
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("--config", metavar="FILE", help="agent config to measure (default: built-in defaults)")
    p.add_argument("--max-frames", type=positive_int, metavar="N", help="stop after N frames")
    p.add_argument("--rounds", type=positive_int, default=3, metavar="N",
                   help="run the pipelines in turn N times and report each one's fastest round (default 3)")
    p.add_argument("--no-classic", action="store_true", help="skip the classic reference (it needs TensorFlow)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-only reference")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots (latency per stage, frames/s) into DIR")
    p.add_argument("--plot-name", metavar="NAME", type=name_part,
                   help="name the plots fps_NAME.png, latency_NAME.png (default: the video's file name)")
    p.set_defaults(tool="bench")


def _overrides(args: argparse.Namespace) -> dict:
    given = {"source": args.source, "mqtt.host": args.mqtt_host, "mqtt.port": args.mqtt_port,
             "mqtt.topic_prefix": args.topic_prefix, "log_level": args.log_level}
    return {key: value for key, value in given.items() if value is not None}  # None: the option was not given


def _cmd_check_config(args: argparse.Namespace) -> int:
    from agent.capture import camera_device_missing, check_file_source, classify_source  # OpenCV: once valid

    cfg = load_config(args.file)
    try:
        kind, target = classify_source(cfg.source)  # the checks `run` makes before opening it
        check_file_source(kind, target)
    except SourceError as exc:
        what = str(exc)
        raise ConfigError(setting_location(args.file, "source")
                          + (what if what.startswith("source") else f"source: {what}")) from None
    # What `run` loads before its first frame, so that OK here means it starts there.
    from agent.mqtt import check_tls_files
    from agent.classify import make_classifier
    from agent.detect import make_detector

    if cfg.mqtt.tls.enabled:
        check_tls_files(cfg.mqtt.tls.ca_file, cfg.mqtt.tls.cert_file, cfg.mqtt.tls.key_file)
    make_detector(cfg.detector)
    make_classifier(cfg.classifier)
    waiting = " (not present now: run waits for it)" if camera_device_missing(kind, target) else ""
    print(f"{args.file}: OK (source {redact_url(cfg.source)}: {kind}{waiting}, broker {cfg.mqtt.host}:{cfg.mqtt.port}, "
          f"detector {cfg.detector.kind})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.supervisor import RunOptions, Supervisor  # OpenCV and the interpreter: only when running

    cfg = _load_run_config(args)
    logger.debug("configuration: %s", cfg.redacted())
    options = RunOptions(config_file=args.config, topic_prefix=args.topic_prefix, show=args.show,
                         realtime=args.realtime, loop=args.loop, flush_timeout=args.flush_timeout)
    return Supervisor(cfg, options, reload=lambda: _load_run_config(args)).run()


def _load_run_config(args: argparse.Namespace) -> Config:
    """The config `run` uses, at start and at each reload, with its log level applied."""
    cfg = load_config(args.config, _overrides(args))
    _configure_logging(cfg.log_level)
    return cfg


COMMANDS = {"run": _cmd_run, "check-config": _cmd_check_config}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        handler = COMMANDS.get(args.command) or import_module(f"agent.tools.{args.tool}").command
        return flushed(handler(args))
    except (KeyboardInterrupt, Exception) as exc:  # a Ctrl-C also during start-up, while the imports run
        return 130 if interrupted(exc) else report_error(exc)


if __name__ == "__main__":
    sys.exit(main())
