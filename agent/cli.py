"""`emotion-agent`: turns arguments into a config and calls the right piece. Every AgentError
becomes one line on stderr and an exit code; no traceback reaches the user."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from importlib import import_module
from typing import TYPE_CHECKING, Sequence

from agent import __version__
from agent.argtypes import Parser, name_part, plot_file, port, positive_int, positive_seconds
from agent.config import Config, load_config, read_password, redact_url, setting_location
from agent.errors import (AgentError, ConfigError, SourceError, flushed, interrupted, report_error,
                          where_raised)
from agent.signal_event import SignalSafeEvent

if TYPE_CHECKING:  # paho and OpenCV load only when running
    from agent.mqtt import MqttPublisher

logger = logging.getLogger("agent")

FLUSH_TIMEOUT_S = 30.0
SIGNAL_FLUSH_S = 3.0  # leaves room in the 10 s the unit gives for a clean stop (TimeoutStopSec)


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
    from agent.pipeline import make_classifier_from, make_detector_from

    if cfg.mqtt.tls.enabled:
        check_tls_files(cfg.mqtt.tls.ca_file, cfg.mqtt.tls.cert_file, cfg.mqtt.tls.key_file)
    make_detector_from(cfg)
    make_classifier_from(cfg)
    waiting = " (not present now: run waits for it)" if camera_device_missing(kind, target) else ""
    print(f"{args.file}: OK (source {redact_url(cfg.source)}: {kind}{waiting}, broker {cfg.mqtt.host}:{cfg.mqtt.port}, "
          f"detector {cfg.detector.kind})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.pipeline import build_agent, retained_topics  # OpenCV and the interpreter: only when running
    from agent.retained_record import RetainedRecord, record_path

    cfg: Config = load_config(args.config, _overrides(args))
    _configure_logging(cfg.log_level)
    logger.debug("configuration: %s", cfg.redacted())
    kept_publisher = None  # carried across a reload that leaves the connection as it was
    previous_cfg: Config | None = None
    # Outside the loop: a SIGTERM or SIGHUP that comes while a reload builds the next agent (models
    # loading, the old broker flushing) is acted on, not forgotten with the agent it was sent to.
    terminate = SignalSafeEvent()  # also ends the wait for the broker after a file run
    reload_pending = SignalSafeEvent()
    record = RetainedRecord(record_path(os.environ.get("STATE_DIRECTORY"), args.config, args.topic_prefix))
    start_index = 0  # where a video file starts: after a reload, the frame the last agent reached
    first_face_id = 1  # after a reload, the last agent's next: a face id is never reused while the process runs
    while True:
        if terminate.is_set():
            if kept_publisher is not None:  # stopped between two agents: the kept connection says goodbye
                kept_publisher.flush(SIGNAL_FLUSH_S)
                kept_publisher.close(timeout=1.0)
            return 0
        try:
            agent = build_agent(cfg, show=args.show, realtime=args.realtime, loop=args.loop, start_index=start_index,
                                first_face_id=first_face_id, publisher=kept_publisher)
        except Exception as exc:
            if previous_cfg is None:
                raise
            # A reloaded config that validates can still fail to start (a source gone, a model the
            # interpreter refuses): carry on with the one that ran.
            logger.error("SIGHUP: cannot start with the new configuration, keeping the old one: %s", exc)
            cfg, previous_cfg = previous_cfg, None  # with kept_publisher None, a new connection
            continue

        def on_stop(signum, _frame, agent=agent) -> None:
            terminate.set()
            logger.info("received %s: stopping", signal.Signals(signum).name)
            agent.stop()

        def on_hup(signum, _frame, agent=agent) -> None:
            if args.config is None:
                logger.warning("SIGHUP: no --config file to reload; ignored")
                return
            reload_pending.set()
            agent.notifier.reloading()  # before the loop's STOPPING=1, which systemd then ignores
            agent.stop()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, on_hup)
        # Signalled while this agent was being built (the handlers were the old agent's): it runs
        # no frame. For a reload it must not tell systemd STOPPING=1, which would start a stop.
        if terminate.is_set():
            agent.stop()
        elif reload_pending.is_set():
            agent.notifier.reloading()
            agent.stop()
        # What an earlier run (before a restart with another config) left retained and this one
        # will not overwrite: emptied, or Home Assistant keeps the old device beside the new one.
        # After a reload the old agent has emptied them already (Agent.retract_retained), but
        # perhaps not delivered: once more does no harm.
        stale = record.begin(f"{cfg.mqtt.host}:{cfg.mqtt.port}", retained_topics(cfg))
        if agent.empty_retained(stale):
            logger.info("emptying %d retained topic(s) an earlier configuration left on the broker", len(stale))
        if kept_publisher is None:
            agent.publisher.start()
        try:
            result = agent.run()
        finally:
            agent.source.close()
            if agent.preview is not None:
                agent.preview.close()
        if reload_pending.is_set() and not terminate.is_set():
            reload_pending.clear()
            try:
                new_cfg = load_config(args.config, _overrides(args))
                _configure_logging(new_cfg.log_level)
                logger.info("SIGHUP: configuration reloaded from %s", args.config)
            except ConfigError as exc:
                logger.error("SIGHUP: new configuration rejected, keeping the old one: %s", exc)
                new_cfg = cfg
            except Exception as exc:  # a running daemon must not die of a file someone edited
                logger.error("SIGHUP: cannot read the new configuration, keeping the old one: %s: %s (%s)",
                             type(exc).__name__, exc, where_raised(exc))
                new_cfg = cfg
            # A video file goes on from the frame it reached: played from the start again, its
            # events would all be published twice. (With --loop it starts over anyway.)
            file_run = not (args.loop or agent.source.live or agent.source.still)
            start_index = result.next_index if file_run and new_cfg.source == cfg.source else 0
            if start_index:
                logger.info("SIGHUP: the video goes on from frame %d", start_index)
            first_face_id = agent.tracker.next_id
            if _same_connection(cfg, new_cfg, agent.publisher):
                # The same broker, topics and queue: keep the connection and whatever waits in its
                # queue, with no `offline` blip for subscribers.
                kept_publisher = agent.publisher
            else:
                kept_publisher = None
                if agent.retract_retained(keep=retained_topics(new_cfg)):
                    logger.info("SIGHUP: the topics moved; the old ones' retained messages are emptied")
                if not agent.publisher.flush(min(args.flush_timeout, SIGNAL_FLUSH_S)):
                    logger.warning("SIGHUP: the broker settings changed with %d message(s) undelivered to the "
                                   "old broker; they are dropped", agent.publisher.pending())
                agent.publisher.close(timeout=1.0)
            cfg, previous_cfg = new_cfg, cfg
            continue
        # Asked to stop (or a live source): exit promptly, as systemd expects; a file run waits longer
        # so that its exit status can promise every message was delivered.
        prompt = terminate.is_set() or agent.source.live
        delivered = agent.publisher.flush(min(args.flush_timeout, SIGNAL_FLUSH_S) if prompt else args.flush_timeout,
                                          cancel=None if prompt else terminate)
        undelivered = agent.publisher.pending()
        agent.publisher.close(timeout=1.0 if not delivered else 5.0)
        if delivered:
            record.settled()
        logger.info("processed %d frames, %d events", result.frames, result.events)
        if not delivered and terminate.is_set():  # a SIGTERM may also end the wait itself
            logger.warning("stopping with %d message(s) the broker has not acknowledged", undelivered)
            return 0
        if not delivered:
            refused = agent.publisher.last_error
            why = f"failed: {refused}" if refused else f"unreachable for {args.flush_timeout:g} s"
            raise AgentError(f"{undelivered} message(s) not delivered: broker {cfg.mqtt.host}:{cfg.mqtt.port} {why}")
        if agent.publisher.refused and not prompt:  # a file run promises the broker has every message
            raise AgentError(f"{agent.publisher.refused} message(s) refused by broker {cfg.mqtt.host}:{cfg.mqtt.port} "
                             "(the warnings above name their topics)")
        return 0


def _same_connection(old: Config, new: Config, publisher: MqttPublisher) -> bool:
    """Whether a reload can keep the publisher: the same mqtt section and the same password."""
    if new.mqtt != old.mqtt:
        return False
    if new.mqtt.tls.enabled and _tls_files_changed(new.mqtt.tls, publisher):
        return False
    try:
        password = read_password(new.mqtt) if new.mqtt.username else None
    except ConfigError as exc:
        # The connection logged in with the password read before. Closed now, the next one could
        # not log in, nor could the old config start again: the daemon would exit for good.
        logger.warning("SIGHUP: %s; the broker connection keeps the password it has", exc)
        return True
    return password == publisher.settings.password


def _tls_files_changed(tls, publisher: MqttPublisher) -> bool:
    """Whether the TLS files hold other contents than the connection loaded (renewed in place),
    and load: files that cannot be read or loaded now (a copy half done, a certificate renewed
    before its key) keep the connection, as the password does, rather than end the daemon."""
    from agent.mqtt import check_tls_files, tls_files_digest

    try:
        if tls_files_digest(tls.ca_file, tls.cert_file, tls.key_file) == publisher.tls_digest:
            return False
        check_tls_files(tls.ca_file, tls.cert_file, tls.key_file)
    except OSError as exc:
        logger.warning("SIGHUP: cannot read the TLS files (%s); the broker connection keeps those it has",
                       exc.strerror or exc)
        return False
    except ConfigError as exc:
        logger.warning("SIGHUP: %s; the broker connection keeps the TLS files it has", exc)
        return False
    logger.info("SIGHUP: the TLS files changed: connecting again with them")
    return True


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
