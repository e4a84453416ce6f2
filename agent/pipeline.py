"""Wires the stages into the loop: capture -> detect -> classify -> track/smooth -> publish.

Nothing here computes: each stage does its job, this module decides what runs when, times it,
and turns its results into messages.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from agent import payloads
from agent.capture import FrameSource, make_source
from agent.classify import EmotionClassifier, make_classifier
from agent.config import PASSWORD_ENV, Config, client_id, hostname, read_password, topic_root
from agent.detect import FaceDetector, make_detector
from agent.detect_ahead import DetectAhead
from agent.discovery import (DiscoverySettings, birth_topic, device_name_for, discovery_messages, encoded,
                             expire_after_for, node_id_for)
from agent.events import Event, TrackedFace
from agent.faces import FaceStateTracker
from agent.mqtt import BrokerSettings, Callback, Message, MqttPublisher, Publisher
from agent.notify import SystemdNotifier
from agent.signal_event import SignalSafeEvent
from agent.stats import StageTimes, Stopwatch
from agent.topics import Topics
from agent.switch import AnalysisSwitch, state_word
from agent.types import PAUSED, Detection, FaceObservation, Frame

logger = logging.getLogger(__name__)

# How long a still image is held so the smoother can settle on its expression (seconds).
STILL_IMAGE_STEP_S = 0.1
# A camera.max_fps rest wakes this often to ping the watchdog (which sends at most two a WatchdogSec).
PACE_SLICE_S = 1.0
# The least time between two stats that a camera status change sends.
STATUS_STATS_MIN_S = 1.0
# While analysis is paused the loop wakes this often (and at once for a command) to ping the
# watchdog and send the stats and the state when they are due.
PAUSE_SLICE_S = 1.0


def make_tracker_from(cfg: Config, first_id: int = 1) -> FaceStateTracker:
    return FaceStateTracker(cfg.tracking, cfg.smoothing, first_id=first_id)


def make_publisher_from(cfg: Config, topics: Topics, on_birth: Callback) -> MqttPublisher:
    m = cfg.mqtt
    if m.username is None and os.environ.get(PASSWORD_ENV):
        logger.warning("%s is set but mqtt.username is not: connecting without credentials", PASSWORD_ENV)
    settings = BrokerSettings(
        host=m.host, port=m.port, client_id=client_id(m), availability_topic=topics.availability, qos=m.qos,
        keepalive_s=m.keepalive_s, protocol=m.protocol, username=m.username,
        password=read_password(m) if m.username else None,
        tls=m.tls.enabled, ca_file=m.tls.ca_file, cert_file=m.tls.cert_file, key_file=m.tls.key_file,
        tls_insecure=m.tls.insecure, queue_size=m.queue_size, reconnect_min_s=m.reconnect_min_s,
        reconnect_max_s=m.reconnect_max_s)
    publisher = MqttPublisher(settings)
    if m.discovery.enabled:
        publisher.subscribe(birth_topic(m.discovery.prefix), on_birth)
    return publisher


def discovery_settings(cfg: Config) -> DiscoverySettings | None:
    m = cfg.mqtt
    if not m.discovery.enabled:
        return None
    root = topic_root(m)
    return DiscoverySettings(
        prefix=m.discovery.prefix, node_id=node_id_for(client_id(m)), device_name=device_name_for(hostname(), root),
        topics=Topics(root), state_expire_after_s=expire_after_for(_resent_every(cfg, m.summary_interval_s)),
        stats_expire_after_s=expire_after_for(_resent_every(cfg, m.stats_interval_s)))


def _resent_every(cfg: Config, period_s: float) -> float:
    """How often a periodic message goes out: its period, or the frame interval where
    camera.max_fps asks for fewer frames than that (they are sent after a frame)."""
    max_fps = cfg.camera.max_fps
    return max(period_s, 1.0 / max_fps) if max_fps else period_s


def retained_topics(cfg: Config) -> set[str]:
    """The topics an agent with this config keeps retained, besides its availability (which the
    broker and the agent's own close keep telling the truth about)."""
    topics = Topics(topic_root(cfg.mqtt))
    settings = discovery_settings(cfg)
    found = {topics.state, topics.stats, topics.analysis}
    if settings is not None:
        found.update(topic for topic, _ in discovery_messages(settings))
    return found


@dataclass
class RunResult:
    frames: int = 0
    events: int = 0
    stopped_by_user: bool = False
    next_index: int = 0  # the index of the frame after the last one processed: where a reload resumes a file


@dataclass(eq=False)
class _Loop:
    """What one run of the loop carries from step to step."""

    frames: Iterator[tuple[Frame | None, list[Detection] | None]]
    detect_inline: bool  # detect on the loop's thread (a live source, a still image), not ahead of it
    last_state_key: object  # what the last state published said, to send the next only on a change
    result: RunResult = field(default_factory=RunResult)
    window: payloads.SummaryWindow | None = None  # None until the first frame
    next_summary: float = math.inf  # on the frames' clock
    next_stats: float = math.inf
    faces: list[TrackedFace] = field(default_factory=list)
    shown: Frame | None = None  # the last frame in the preview
    now: float = 0.0  # the frames' clock


@dataclass
class Agent:
    """One run of the loop. Build it with `build_agent`, then `run()`; `stop()` from any thread."""

    cfg: Config
    source: FrameSource
    detector: FaceDetector
    classifier: EmotionClassifier
    tracker: FaceStateTracker
    publisher: Publisher
    topics: Topics
    preview: object | None = None
    notifier: SystemdNotifier = field(default_factory=SystemdNotifier)
    clock: Callable[[], float] = time.time
    times: StageTimes = field(default_factory=StageTimes)
    on_frame: Callable[[], None] | None = None  # called after each processed frame (progress, limits)
    switch: AnalysisSwitch = field(default_factory=lambda: AnalysisSwitch(True))  # whether to analyse
    _stop: threading.Event = field(default_factory=SignalSafeEvent)  # set from signal handlers
    _watch: Stopwatch = field(default_factory=Stopwatch)
    _last_detect: float | None = None
    _stats_camera: str | None = None  # the camera status the last stats said
    _stats_at: float = -math.inf  # when the last stats went out (monotonic)
    _state_at: float = -math.inf  # when the last state went out (monotonic)
    _paused: bool = False  # analysis switched off: the source let go, nothing read
    _detected: list = field(default_factory=list)
    _started: float = field(default_factory=time.monotonic)

    def stop(self) -> None:
        self._stop.set()
        self.switch.wake()  # a paused loop waits on it

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- messages ---------------------------------------------------------------------------

    def _publish(self, topic: str, payload: dict, retain: bool = False) -> None:
        self.publisher.publish(Message(topic, payloads.encode(payload), retain=retain, qos=self.cfg.mqtt.qos))

    def _publish_events(self, events: Sequence[Event]) -> None:
        wall = self.clock()
        for event in events:
            payload = payloads.event_payload(event, wall)
            self._publish(self.topics.event(payload["event"]), payload)
            logger.info("%s face %s %s", payload["event"], payload["face_id"],
                        payload.get("emotion", payload.get("last_emotion", "")))

    def _report_lost(self, lost: Sequence[Event], window: payloads.SummaryWindow | None, result: RunResult) -> None:
        """Faces gone without a frame to show it (the camera away, the run over): their events, sent
        and counted in the run and in the summary window."""
        self._publish_events(lost)
        result.events += len(lost)
        if window is not None:
            window.add_events(lost)

    def _publish_state(self, faces: Sequence[TrackedFace]) -> None:
        """The state; while paused, one that says so (there are no faces then)."""
        wall = self.clock()
        payload = payloads.paused_state_payload(wall) if self._paused else payloads.state_payload(faces, wall)
        self._state_at = time.monotonic()
        self._publish(self.topics.state, payload, retain=True)

    def _publish_analysis(self) -> None:
        """The switch's state, ON or OFF, retained: what Home Assistant shows."""
        self.publisher.publish(Message(self.topics.analysis, state_word(not self._paused), retain=True, qos=1))

    def _publish_stats(self) -> None:
        payload = self.stats_payload()
        self._stats_camera = payload["camera"]
        self._stats_at = time.monotonic()
        self._publish(self.topics.stats, payload, retain=True)

    def _stats_due(self) -> bool:
        """A stats interval has passed since the last stats (on the wall clock, for loops without frames)."""
        return time.monotonic() - self._stats_at >= self.cfg.mqtt.stats_interval_s

    def _camera_status_changed(self) -> bool:
        """Whether a live camera's status moved on from what the last stats said: its change goes
        out at once, so an automation on `reconnecting` (or back to `ok`) need not wait a stats
        interval. (A file's one change, to `ended`, goes out with the stats at its end.)"""
        # At most one a second: a camera that fails at each reopen, right after its first frame,
        # flips its status as fast as camera.retry_initial_s (0.05 s at least) lets it.
        return (self.source.live and time.monotonic() - self._stats_at >= STATUS_STATS_MIN_S
                and self.source.status() != self._stats_camera)

    def stats_payload(self) -> dict:
        pub = self.publisher
        return {
            "schema": payloads.SCHEMA_VERSION,
            "timestamp": payloads.iso_time(self.clock()),
            "uptime_s": round(time.monotonic() - self._started, 1),
            "frames": self.times.frames,
            "fps": round(self.times.fps(time.monotonic()), 2),
            "latency_ms": self.times.latency_ms(),
            "dropped_frames": self.source.dropped(),
            "corrupt_frames": self.source.corrupt(),
            "camera": PAUSED if self._paused else self.source.status(),
            "mqtt": {"dropped": pub.dropped, "refused": pub.refused, "pending": pub.pending(), "connects": pub.connects},
        }

    def publish_discovery(self) -> None:
        settings = discovery_settings(self.cfg)
        if settings is None:
            return
        for topic, payload in encoded(discovery_messages(settings)):
            self.publisher.publish(Message(topic, payload, retain=True, qos=1))

    def retract_retained(self, keep: set[str]) -> int:
        """Empties, on the broker, what this agent left retained (discovery, state, stats) outside
        `keep`: after a reload that moves the topics, Home Assistant drops the old device instead of
        keeping it, dead, beside the new one. Returns how many topics were emptied."""
        return self.empty_retained(retained_topics(self.cfg) - keep)

    def empty_retained(self, topics: set[str]) -> int:
        """Publishes an empty retained message (which deletes the retained one) to each of `topics`."""
        for topic in sorted(topics):
            self.publisher.publish(Message(topic, "", retain=True, qos=1))
        return len(topics)

    # --- the loop ---------------------------------------------------------------------------

    def _pace(self, frame_started: float) -> None:
        """With camera.max_fps, rest until the next frame slot (a live source keeps only the newest).
        The rest is the agent's own choice, not a hang: the watchdog is pinged through it, or a
        max_fps below one frame per WatchdogSec would have systemd kill the service at every rest."""
        max_fps = self.cfg.camera.max_fps
        if not (max_fps and self.source.live):
            return
        until = frame_started + 1.0 / max_fps
        # an OFF ends the rest at once: the camera must close within a second, whatever max_fps says
        while (rest := until - time.monotonic()) > 0 and not self._stop.is_set() and self.switch.enabled:
            self.switch.wait_changed(min(rest, PACE_SLICE_S))
            self.notifier.watchdog()

    def _is_due(self, frame) -> bool:
        """Whether this frame gets a fresh detection (at most every detector.interval_s of the
        frames' own time). Called once per frame, in frame order.

        Expressions change within a frame or two, faces move little in a tenth of a second: so the
        cheap classifier runs on every frame, and the detector, the costliest stage, only as often
        as the interval asks. The tracker still sees a box for every face on every frame."""
        interval = self.cfg.detector.interval_s
        elapsed = frame.timestamp - (self._last_detect if self._last_detect is not None else -math.inf)
        # 1 ms of slack: frame times of a 10 frames/s video are 0.1 apart only up to float rounding
        if elapsed >= interval - 1e-3 or elapsed < 0:
            self._last_detect = frame.timestamp
            return True
        return False

    def _prepare_detection(self, frame) -> tuple[object, float]:
        started = time.perf_counter()
        prepared = self.detector.prepare(frame.image)
        return prepared, time.perf_counter() - started

    def _run_detection(self, job: tuple[object, float]) -> list[Detection]:
        prepared, prepare_s = job
        started = time.perf_counter()
        detections = self.detector.run(prepared)
        self.times.add("detect", prepare_s + time.perf_counter() - started)
        return detections

    def _process(self, frame, fresh: list[Detection] | None) -> list[FaceObservation]:
        if fresh is not None:
            self._detected = fresh
        detections = self._detected
        self._watch.lap()
        scores = (self.classifier.classify(frame.image, [d.box for d in detections], [d.roll for d in detections])
                  if detections else [])
        self.times.add("classify", self._watch.lap())
        return [FaceObservation(d, s) for d, s in zip(detections, scores)]

    def _frames(self, ahead: bool):
        """(frame, fresh detections or None) until a finite source ends; (None, None) while a live
        one has nothing. With `ahead`, the detections come from a thread running ahead; without,
        always None (the loop detects)."""
        if ahead:
            reader = DetectAhead(self.source, self._is_due, self._prepare_detection, self._run_detection)
            try:
                while (item := reader.read()) is not None:
                    yield item
            finally:
                reader.close()
            return
        while True:
            frame = self.source.read()
            if frame is None and not self.source.live:
                return
            yield frame, None

    def run(self) -> RunResult:
        loop = self._begin()
        try:
            while not self._stop.is_set() and self._step(loop):
                pass
        finally:
            loop.frames.close()  # stops DetectAhead's thread, before anyone releases the video under it
        self._finish(loop)
        return loop.result

    def _begin(self) -> _Loop:
        """What goes out before the first frame, and the loop's state."""
        self.publish_discovery()
        # A camera is opened only now, and only with analysis on (make_source made it paused).
        self._paused = not self.switch.enabled
        (self.source.pause if self._paused else self.source.resume)()
        if self._paused:
            logger.info("analysis is off: waiting for ON on %s", self.topics.analysis_command)
        self._publish_analysis()
        # No face until a frame shows one: this replaces whatever an earlier process left retained
        # (a crash, a watchdog restart, a camera absent at boot), which would read as faces in view.
        self._publish_state([])
        # The same for stats: the last run's would show its camera status and speed, `reconnecting`
        # after a watchdog restart, until the first stats of this run, a stats interval later.
        self._publish_stats()
        # Started: config, models and MQTT are up. Not after the first frame: a camera not plugged
        # in yet (a first install) held `systemctl start` for TimeoutStartSec, then failed it; the
        # camera status says what comes next. None for a run stopped (or reloaded) before it began.
        if not self._stop.is_set():
            self.notifier.ready()
        # A file is detected ahead of the loop; a live source (newest frame only) or a still image inline.
        detect_inline = self.source.live or self.source.still
        return _Loop(frames=self._frames(ahead=not detect_inline), detect_inline=detect_inline,
                     last_state_key=payloads.state_key([]))

    def _step(self, loop: _Loop) -> bool:
        """One frame, or one wait for a live source that has none or while paused; False once the
        run is over."""
        paused = not self.switch.enabled
        if paused != self._paused:
            self._set_paused(loop, paused)
        if paused:
            self._paused_step(loop)
            return True
        frame_started = time.monotonic()
        frame, fresh = next(loop.frames, (None, None))
        if frame is not None:
            return self._frame(loop, frame, fresh, frame_started)
        if not self.source.live:
            return False
        self._no_frame(loop)
        return True

    def _frame(self, loop: _Loop, frame: Frame, fresh: list[Detection] | None, frame_started: float) -> bool:
        """Detect, classify, track and publish one frame; False if the preview was closed."""
        self.times.add("decode", self._watch.lap())
        events = self._track(loop, frame, fresh)
        self._publish_frame(loop, events)
        self._frame_done(loop, frame)
        if self.preview is not None:
            loop.shown = frame
            if not self.preview.show(frame.image, loop.faces, self.times.fps()):
                loop.result.stopped_by_user = True
                return False
        if self.on_frame is not None:
            self.on_frame()
        self._pace(frame_started)
        self._watch.lap()
        return True

    def _track(self, loop: _Loop, frame: Frame, fresh: list[Detection] | None) -> list[Event]:
        loop.now = frame.timestamp
        if loop.window is None:
            loop.window = payloads.SummaryWindow(started=loop.now)
            loop.next_summary = loop.now + self.cfg.mqtt.summary_interval_s
            loop.next_stats = loop.now + self.cfg.mqtt.stats_interval_s
        if loop.detect_inline and self._is_due(frame):
            fresh = self._run_detection(self._prepare_detection(frame))
        observations = self._process(frame, fresh)
        loop.faces, events = self.tracker.update(loop.now, observations)
        if self.source.still:
            events += self._settle(loop, observations)
        self.times.add("track", self._watch.lap())
        return events

    def _settle(self, loop: _Loop, observations: list[FaceObservation]) -> list[Event]:
        """A still image: the same observations held while the smoother settles."""
        settle = self.cfg.smoothing.dwell_s + 3 * self.cfg.smoothing.window_s
        started = t = loop.now
        events: list[Event] = []
        while t < started + settle:
            t += STILL_IMAGE_STEP_S
            loop.faces, more = self.tracker.update(t, observations)
            events += more
        loop.now = t
        return events

    def _publish_frame(self, loop: _Loop, events: list[Event]) -> None:
        """A frame's events, the state if it changed, and the summary when one is due."""
        loop.window.add_frame(loop.now, loop.faces, events)
        self._publish_events(events)
        loop.result.events += len(events)
        key = payloads.state_key(loop.faces)
        if key != loop.last_state_key:
            self._set_state(loop, loop.faces)
        if loop.now >= loop.next_summary:
            self._publish(self.topics.summary, loop.window.payload(loop.now, loop.faces, self.clock()))
            self._publish_state(loop.faces)  # a heartbeat for expire_after
            loop.window = payloads.SummaryWindow(started=loop.now)
            loop.next_summary = loop.now + self.cfg.mqtt.summary_interval_s
        self.times.add("publish", self._watch.lap())

    def _frame_done(self, loop: _Loop, frame: Frame) -> None:
        """Counts a processed frame, tells systemd, and sends the stats when they are due."""
        self.times.frame_done(time.monotonic())
        loop.result.frames += 1
        loop.result.next_index = frame.index + 1
        if loop.result.frames == 1:
            logger.info("first frame processed; running")
        self.notifier.status("processing frames")  # sent only when it changes
        self.notifier.watchdog()
        if loop.now >= loop.next_stats:
            self._publish_stats()
            loop.next_stats = loop.now + self.cfg.mqtt.stats_interval_s
        elif self._camera_status_changed():
            self._publish_stats()

    def _no_frame(self, loop: _Loop) -> None:
        """No frame from the camera: keep telling the world (stats carry the camera status), but
        never ping the watchdog, so a camera hung for good gets the service restarted."""
        status = self.source.status()
        self.notifier.status(f"camera {status}")
        # Faces unseen for longer than tracking.max_gap_s are gone, frame or no frame (a live
        # source's frame times are monotonic): a face seen after the outage is a new one. A
        # source slower than the gap is waited for twice its interval. One the source says is
        # away is not: after a single frame no rate is known, and its faces would stay for good.
        gap = self.cfg.tracking.max_gap_s
        lost = self.tracker.expire(time.monotonic(), gap if status == "reconnecting" else self.times.stalled_after(gap))
        if lost:
            self._report_lost(lost, loop.window, loop.result)
            self._set_state(loop, self.tracker.faces())
        if self._stats_due() or self._camera_status_changed():
            self._publish_stats()

    def _set_paused(self, loop: _Loop, paused: bool) -> None:
        """Analysis switched off: the source lets go of the camera and the faces in view are lost
        (once). Back on: the source opens it again (or the file goes on), and new faces get new ids,
        as the tracker goes on counting. Either way the state, the switch and the stats say so."""
        self._paused = paused
        if paused:
            self.source.pause()
            self._report_lost(self.tracker.close(loop.now), loop.window, loop.result)
        else:
            self.source.resume()
        self._set_state(loop, [])
        self._publish_analysis()
        self._publish_stats()
        if not paused:
            logger.info("analysis resumed")
        else:
            logger.info("analysis paused: %s", "the camera is closed" if self.source.live else "the file is not read")

    def _paused_step(self, loop: _Loop) -> None:
        """While paused nothing is read. The agent is not hung: the watchdog is pinged, and the stats
        and the paused state (a heartbeat for Home Assistant's expire_after) go out at their
        intervals, on the wall clock."""
        self.notifier.status("analysis paused")
        self.notifier.watchdog()
        if self._stats_due():
            self._publish_stats()
        if time.monotonic() - self._state_at >= self.cfg.mqtt.summary_interval_s:
            self._publish_state([])
        self.switch.wait_changed(PAUSE_SLICE_S)

    def _set_state(self, loop: _Loop, faces: list[TrackedFace]) -> None:
        loop.faces = faces
        self._publish_state(faces)
        loop.last_state_key = payloads.state_key(faces)

    def _finish(self, loop: _Loop) -> None:
        """The end: every open face is lost, then a final summary, state and stats."""
        if (self.preview is not None and loop.shown is not None and self.source.still
                and not loop.result.stopped_by_user):
            self.preview.hold(loop.shown.image, loop.faces, self.times.fps(), self._stop.is_set)
        self.notifier.stopping()
        self._report_lost(self.tracker.close(loop.now), loop.window, loop.result)
        if loop.window is not None:
            self._publish(self.topics.summary, loop.window.payload(loop.now, [], self.clock()))
        self._publish_state([])
        self._publish_stats()


def build_agent(cfg: Config, *, show: bool = False, realtime: bool = False, loop: bool = False,
                start_index: int = 0, first_face_id: int = 1, source: FrameSource | None = None,
                publisher: Publisher | None = None, switch: AnalysisSwitch | None = None) -> Agent:
    """Every stage from the config (a source or publisher given here replaces the configured one;
    `start_index`: the frame a video file starts at; `first_face_id`: the id of its first face, so
    that a reload reuses none; `switch`: whether to analyse, the supervisor's, which outlives the
    agent; without one, always). A publisher made here takes the switch's commands. Raises
    AgentError subclasses with one-line messages."""
    switch = switch or AnalysisSwitch(True)
    topics = Topics(topic_root(cfg.mqtt))
    preview = None
    if show:  # first: a missing display should not wait for the models to load
        from agent.preview import Preview

        preview = Preview()
    if source is None:
        source = make_source(cfg.source, cfg.camera, realtime=realtime, loop=loop, start_index=start_index)
    try:
        detector = make_detector(cfg.detector)
        classifier = make_classifier(cfg.classifier)
    except BaseException:
        # The source may already run a decode thread: left running, it aborts the interpreter
        # at exit ("terminate called without an active exception") after the one-line error.
        source.close()
        raise
    holder: dict[str, Agent] = {}

    def on_birth(topic: str, payload: bytes, retained: bool) -> None:
        agent = holder.get("agent")
        if agent is not None and payload.strip().lower() == b"online":
            logger.info("Home Assistant came online: re-sending discovery and state")
            agent.publisher.republish_retained()

    if publisher is None:
        try:
            publisher = make_publisher_from(cfg, topics, on_birth)
        except BaseException:
            source.close()
            raise
        # Subscribed with the agent's own credentials, under the broker's ACL; again at every connect.
        publisher.subscribe(topics.analysis_command, switch.command)
    agent = Agent(cfg=cfg, source=source, detector=detector, classifier=classifier,
                  tracker=make_tracker_from(cfg, first_face_id), publisher=publisher, topics=topics, preview=preview,
                  switch=switch)
    holder["agent"] = agent
    return agent
