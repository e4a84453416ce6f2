"""The run's lifecycle around the loop: one agent after another in this process (the first, then
one per reload), the signals that stop or reload it, the broker connection a reload keeps, the
record of retained topics, and the exit status once the last one ends.

`Supervisor(cfg, options, reload).run()` is all `emotion-agent run` does after loading its config.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from agent import pipeline
from agent.config import Config, read_password
from agent.errors import AgentError, ConfigError, where_raised
from agent.mqtt import MqttPublisher, Publisher, check_tls_files, tls_files_digest
from agent.pipeline import Agent, RunResult, retained_topics
from agent.retained_record import RetainedRecord, record_path
from agent.signal_event import SignalSafeEvent
from agent.switch import AnalysisSwitch, state_word

logger = logging.getLogger(__name__)

SIGNAL_FLUSH_S = 3.0  # leaves room in the 10 s the unit gives for a clean stop (TimeoutStopSec)
# Before a new connection's first agent opens its camera, so that a retained OFF keeps closed a
# camera that was never opened: how long the broker is waited for (one on the same host or LAN
# answers well within it; one that refuses or is not there is not waited for) ...
BROKER_WAIT_S = 5.0
# ... and then for it to acknowledge `online`, sent after the SUBSCRIBE: a broker answers a client
# in order, so by then it has sent the retained command, if there is one.
COMMAND_WAIT_S = 1.0


@dataclass(frozen=True)
class RunOptions:
    """What the command line says about the run, besides the config."""

    flush_timeout: float  # at the end of a file run, how long to wait for the broker to take every message
    config_file: str | None = None  # None: nothing to reload on SIGHUP
    topic_prefix: str | None = None  # --topic-prefix: part of the retained record's name
    show: bool = False
    realtime: bool = False
    loop: bool = False


class Supervisor:
    """Runs agents until a stop, a file's end or a fatal error; returns the exit status.

    `reload` reads the config file again (and applies its log level); it raises ConfigError for a
    config that does not validate. The privacy switch is the supervisor's: a reload keeps what
    the last MQTT command said."""

    def __init__(self, cfg: Config, options: RunOptions, reload: Callable[[], Config]):
        self.cfg = cfg
        self.options = options
        self._reload = reload
        self._previous_cfg: Config | None = None  # the config to fall back to if the reloaded one cannot start
        self._kept_publisher: Publisher | None = None  # carried across a reload that leaves the connection as it was
        # Not an agent's: a SIGTERM or SIGHUP that comes while a reload builds the next agent (models
        # loading, the old broker flushing) is acted on, not forgotten with the agent it was sent to.
        self.terminate = SignalSafeEvent()  # also ends the wait for the broker after a file run
        self.reload_pending = SignalSafeEvent()
        self._agent: Agent | None = None  # the one signals go to
        self._record = RetainedRecord(record_path(os.environ.get("STATE_DIRECTORY"), options.config_file,
                                                  options.topic_prefix))
        self._start_index = 0  # where a video file starts: after a reload, the frame the last agent reached
        self._first_face_id = 1  # after a reload, the last agent's next: a face id is never reused while the process runs
        self.switch = AnalysisSwitch(cfg.camera.enabled)

    def run(self) -> int:
        while not self.terminate.is_set():
            agent = self._build()
            if agent is None:
                continue
            result = self._run_agent(agent)
            if self.terminate.is_set() or not self.reload_pending.is_set():
                return self._finish(agent, result)
            self.reload_pending.clear()
            self._reload_after(agent, result)
        self._close_kept_publisher()
        return 0

    # --- one agent -------------------------------------------------------------------------

    def _build(self) -> Agent | None:
        """The next agent; None after a reloaded config that failed to start (the old one is back)."""
        o = self.options
        try:
            return pipeline.build_agent(self.cfg, show=o.show, realtime=o.realtime, loop=o.loop,
                                        start_index=self._start_index, first_face_id=self._first_face_id,
                                        publisher=self._kept_publisher, switch=self.switch)
        except Exception as exc:
            if self._previous_cfg is None:
                raise
            # A reloaded config that validates can still fail to start (a source gone, a model the
            # interpreter refuses): carry on with the one that ran.
            logger.error("SIGHUP: cannot start with the new configuration, keeping the old one: %s", exc)
            self.cfg, self._previous_cfg = self._previous_cfg, None
            self.switch.configure(self.cfg.camera.enabled)  # the rejected config's setting goes with it
            return None

    def _run_agent(self, agent: Agent) -> RunResult:
        self._attend(agent)
        # What an earlier run (before a restart with another config) left retained and this one
        # will not overwrite: emptied, or Home Assistant keeps the old device beside the new one.
        # After a reload the old agent has emptied them already (Agent.retract_retained), but
        # perhaps not delivered: once more does no harm.
        stale = self._record.begin(f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}", retained_topics(self.cfg))
        if agent.empty_retained(stale):
            logger.info("emptying %d retained topic(s) an earlier configuration left on the broker", len(stale))
        if self._kept_publisher is None:
            agent.publisher.start()
            self._await_retained_command(agent)
        try:
            return agent.run()
        finally:
            agent.source.close()
            if agent.preview is not None:
                agent.preview.close()

    def _await_retained_command(self, agent: Agent) -> None:
        """Gives a retained command the time to arrive before the agent's camera opens (a reboot
        while paused stays paused). Without a broker, camera.enabled decides until one connects."""
        publisher = agent.publisher
        deadline = time.monotonic() + BROKER_WAIT_S
        while not publisher.wait_connected(0.1):
            if publisher.last_error is not None or time.monotonic() >= deadline:
                logger.info("no broker yet: analysis %s as camera.enabled says, until a command on %s says "
                            "otherwise", state_word(self.switch.enabled), agent.topics.analysis_command)
                return
            if agent.stopping:
                return
        publisher.flush(COMMAND_WAIT_S, cancel=self.terminate)

    # --- signals ---------------------------------------------------------------------------

    def _attend(self, agent: Agent) -> None:
        """Signals go to `agent` from now on. One that came while it was being built (the handlers
        were the old agent's) has it run no frame; for a reload it must not tell systemd
        STOPPING=1, which would start a stop."""
        self._agent = agent
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_hup)
        if self.terminate.is_set():
            agent.stop()
        elif self.reload_pending.is_set():
            agent.notifier.reloading()
            agent.stop()

    def _on_stop(self, signum, _frame) -> None:
        self.terminate.set()
        logger.info("received %s: stopping", signal.Signals(signum).name)
        self._agent.stop()

    def _on_hup(self, signum, _frame) -> None:
        if self.options.config_file is None:
            logger.warning("SIGHUP: no --config file to reload; ignored")
            return
        self.reload_pending.set()
        self._agent.notifier.reloading()  # before the loop's STOPPING=1, which systemd then ignores
        self._agent.stop()

    # --- reload ----------------------------------------------------------------------------

    def _reload_after(self, agent: Agent, result: RunResult) -> None:
        """Reads the config again and sets up the next agent to go on from `agent`."""
        new_cfg = self._reloaded_config()
        self.switch.configure(new_cfg.camera.enabled)
        if self.switch.enabled != new_cfg.camera.enabled:
            logger.info("SIGHUP: camera.enabled is %s, but the last command on %s (%s) decides while the agent runs",
                        str(new_cfg.camera.enabled).lower(), agent.topics.analysis_command,
                        state_word(self.switch.enabled))
        # A video file goes on from the frame it reached: played from the start again, its
        # events would all be published twice. (With --loop it starts over anyway.)
        file_run = not (self.options.loop or agent.source.live or agent.source.still)
        self._start_index = result.next_index if file_run and new_cfg.source == self.cfg.source else 0
        if self._start_index:
            logger.info("SIGHUP: the video goes on from frame %d", self._start_index)
        self._first_face_id = agent.tracker.next_id
        self._kept_publisher = self._hand_over_connection(agent, new_cfg)
        self.cfg, self._previous_cfg = new_cfg, self.cfg

    def _reloaded_config(self) -> Config:
        try:
            new_cfg = self._reload()
            logger.info("SIGHUP: configuration reloaded from %s", self.options.config_file)
            return new_cfg
        except ConfigError as exc:
            logger.error("SIGHUP: new configuration rejected, keeping the old one: %s", exc)
        except Exception as exc:  # a running daemon must not die of a file someone edited
            logger.error("SIGHUP: cannot read the new configuration, keeping the old one: %s: %s (%s)",
                         type(exc).__name__, exc, where_raised(exc))
        return self.cfg

    def _hand_over_connection(self, agent: Agent, new_cfg: Config) -> Publisher | None:
        """The publisher the next agent keeps, or None (this one's closed) where the broker settings
        changed."""
        if same_connection(self.cfg, new_cfg, agent.publisher):
            # The same broker, topics and queue: keep the connection and whatever waits in its
            # queue, with no `offline` blip for subscribers.
            return agent.publisher
        if agent.retract_retained(keep=retained_topics(new_cfg)):
            logger.info("SIGHUP: the topics moved; the old ones' retained messages are emptied")
        if not agent.publisher.flush(min(self.options.flush_timeout, SIGNAL_FLUSH_S)):
            logger.warning("SIGHUP: the broker settings changed with %d message(s) undelivered to the "
                           "old broker; they are dropped", agent.publisher.pending())
        agent.publisher.close(timeout=1.0)
        return None

    def _close_kept_publisher(self) -> None:
        """Stopped between two agents: the kept connection says goodbye."""
        if self._kept_publisher is not None:
            self._kept_publisher.flush(SIGNAL_FLUSH_S)
            self._kept_publisher.close(timeout=1.0)

    # --- the end ---------------------------------------------------------------------------

    def _finish(self, agent: Agent, result: RunResult) -> int:
        """Delivers what is left and gives the exit status. Asked to stop (or a live source), it
        exits promptly, as systemd expects; a file run waits longer so that its exit status can
        promise every message was delivered."""
        publisher = agent.publisher
        prompt = self.terminate.is_set() or agent.source.live
        timeout = min(self.options.flush_timeout, SIGNAL_FLUSH_S) if prompt else self.options.flush_timeout
        delivered = publisher.flush(timeout, cancel=None if prompt else self.terminate)
        undelivered = publisher.pending()
        publisher.close(timeout=1.0 if not delivered else 5.0)
        if delivered:
            self._record.settled()
        logger.info("processed %d frames, %d events", result.frames, result.events)
        if not delivered and self.terminate.is_set():  # a SIGTERM may also end the wait itself
            logger.warning("stopping with %d message(s) the broker has not acknowledged", undelivered)
            return 0
        broker = f"broker {self.cfg.mqtt.host}:{self.cfg.mqtt.port}"
        if not delivered:
            why = (f"failed: {publisher.last_error}" if publisher.last_error
                   else f"unreachable for {self.options.flush_timeout:g} s")
            raise AgentError(f"{undelivered} message(s) not delivered: {broker} {why}")
        if publisher.refused and not prompt:  # a file run promises the broker has every message
            raise AgentError(f"{publisher.refused} message(s) refused by {broker} (the warnings above name their topics)")
        return 0


def same_connection(old: Config, new: Config, publisher: MqttPublisher) -> bool:
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
