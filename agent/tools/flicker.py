"""`python -m agent.tools.flicker VIDEO...`: how much the emitted emotion flickers, against the raw labels.

Runs detect -> classify -> FaceStateTracker over every frame of each video at its own timestamps
(frame index / fps) and reports, per face-minute (the time faces are in view, summed over faces):

- raw label changes: the argmax of the classifier's scores differs from the same face's previous
  frame;
- emitted changes: EmotionChanged events, without the first one per face (uncertain -> first
  known emotion), which is reported apart;
- delay: for each raw change to a label that then holds for at least `--hold-s` (1 s) on that face,
  while the face was not already emitted in that label, the time until an EmotionChanged to it
  (missed if none within `--horizon-s`). Few raw changes hold a whole second in every frame (the
  classifier is noisy), so also:
- spliced delay: every 1 s window of a face in which one emotion clearly held (see HeldWindow),
  played after every held window of another emotion, from any of the videos; the time from the
  step to the EmotionChanged to the new emotion. Real classifier noise, known step times.

The bar the defaults were tuned to: emitted changes at most a fifth of the raw ones, and an
expression held for a second gets its event within about a second. `--every N` keeps every Nth
frame (at its own timestamp) to check the same at a lower frame rate.

One pass over these few face-seconds is partly chance: `--noise-runs N` adds N passes with +-1
grey level of seeded noise on every frame and pools them. Held windows come from the run's own
raw labels, so a noisier detector also finds fewer of its own misses; `--agreement` compares the
emitted emotions, frame by frame and face by face, with a fixed reference instead (the built-in
defaults with the detector on every frame, on the same frames).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from agent.errors import ConfigError, flushed, interrupted, report_error
from agent.events import EmotionChanged, Event, TrackedFace
from agent.faces import FaceStateTracker
from agent.tools.progress import Progress, frames_total
from agent.types import EMOTION_LABELS, UNCERTAIN, Box, Detection, EmotionScores, FaceObservation

logger = logging.getLogger(__name__)

# One video's frames: (timestamp, that frame's observations).
Observed = list[tuple[float, list[FaceObservation]]]
# Each face's state in the frames it was seen in, by face id.
Sequences = dict[int, list[tuple[float, TrackedFace]]]
# Each frame's faces, by timestamp: (box, emitted emotion) of each face seen in it.
FrameStates = dict[float, list[tuple[Box, str]]]


@dataclass
class FlickerFigures:
    frames: int = 0
    face_seconds: float = 0.0        # frames each face was seen in x frame interval, summed over faces
    tracks: int = 0
    raw_changes: int = 0
    emitted_changes: int = 0         # EmotionChanged with a previous state
    first_known: int = 0             # EmotionChanged with previous None
    held_changes: int = 0            # raw changes that then held for hold_s
    delays: list[float] = field(default_factory=list)  # one per held change that got its event
    missed: int = 0                  # held changes with no event within the horizon

    def per_minute(self, count: int) -> float:
        return count * 60.0 / self.face_seconds if self.face_seconds > 0 else 0.0

    @property
    def ratio(self) -> float:
        """Emitted changes per raw change (the bar: at most 0.2)."""
        return self.emitted_changes / self.raw_changes if self.raw_changes else 0.0

    def add(self, other: FlickerFigures) -> None:
        for name in ("frames", "face_seconds", "tracks", "raw_changes", "emitted_changes", "first_known",
                     "held_changes", "missed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.delays += other.delays


def face_sequences(observed: Observed, tracker: FaceStateTracker) -> tuple[Sequences, list[Event]]:
    """Each face's states in the frames it was seen in, and every event (the final losses included)."""
    sequences: Sequences = {}
    events: list[Event] = []
    for now, observations in observed:
        faces, frame_events = tracker.update(now, observations)
        events += frame_events
        for face in faces:
            if face.last_seen == now:
                sequences.setdefault(face.face_id, []).append((now, face))
    events += tracker.close(observed[-1][0] if observed else 0.0)
    return sequences, events


def measure(observed: Observed, tracker: FaceStateTracker, *, frame_interval: float, hold_s: float = 1.0,
            horizon_s: float = 3.0) -> FlickerFigures:
    """The figures for one video's observations fed through `tracker`. Pure."""
    sequences, events = face_sequences(observed, tracker)
    return figures_of(sequences, events, frames=len(observed), frame_interval=frame_interval, hold_s=hold_s,
                      horizon_s=horizon_s)


def figures_of(sequences: Sequences, events: list[Event], *, frames: int, frame_interval: float,
               hold_s: float = 1.0, horizon_s: float = 3.0) -> FlickerFigures:
    """`measure`'s figures from a tracker pass already made (`face_sequences`)."""
    figures = FlickerFigures(frames=frames)
    changes: dict[int, list[EmotionChanged]] = {}
    for event in events:
        if isinstance(event, EmotionChanged):
            changes.setdefault(event.face.face_id, []).append(event)
            if event.previous is None:
                figures.first_known += 1
            else:
                figures.emitted_changes += 1
    figures.tracks = len(sequences)
    for face_id, states in sequences.items():
        # (time, raw label, emitted state before this frame)
        samples = [(t, EMOTION_LABELS[f.raw.top], states[k - 1][1].emotion if k else "")
                   for k, (t, f) in enumerate(states)]
        figures.face_seconds += len(samples) * frame_interval
        figures.raw_changes += sum(a[1] != b[1] for a, b in zip(samples, samples[1:]))
        for k in range(1, len(samples)):
            t, label, before = samples[k]
            if label == samples[k - 1][1] or not _holds(samples, k, hold_s, frame_interval):
                continue
            if before == label:
                continue  # already emitted in this label: nothing visible to report
            figures.held_changes += 1
            hit = next((c.at - t for c in changes.get(face_id, [])
                        if c.face.emotion == label and t <= c.at <= t + horizon_s), None)
            if hit is None:
                figures.missed += 1
            else:
                figures.delays.append(hit)
    return figures


@dataclass(frozen=True)
class HeldWindow:
    """`hold_s` of one face's frames in which one emotion clearly held: it leads the mean scores and
    is the per-frame argmax in at least `majority` of the frames."""

    label: str
    before: tuple[tuple[float, EmotionScores], ...]  # the face's frames up to the window's end
    after: tuple[tuple[float, EmotionScores], ...]   # the face's frames from the window's start


def held_windows(sequences: Sequences, *, frame_interval: float,
                 hold_s: float = 1.0, majority: float = 2 / 3) -> list[HeldWindow]:
    windows = []
    for states in sequences.values():
        frames = [(t, f.raw) for t, f in states]
        start = 0
        while start < len(frames):
            t0 = frames[start][0]
            end = start + 1  # one frame at least: one alone spans hold_s where frames are over 2 * hold_s apart
            while end < len(frames) and frames[end][0] < t0 + hold_s - frame_interval / 2:
                end += 1
            if end >= len(frames):
                break  # the face left before a full window
            probs = [f.probs for _, f in frames[start:end]]
            label = int(max(range(len(EMOTION_LABELS)), key=lambda i: sum(p[i] for p in probs)))
            share = sum(max(range(len(p)), key=p.__getitem__) == label for p in probs) / len(probs)
            # Whole windows only: the face seen in (nearly) every frame of them.
            if share >= majority and end - start >= 0.9 * hold_s / frame_interval:
                windows.append(HeldWindow(EMOTION_LABELS[label], tuple(frames[:end]), tuple(frames[start:])))
            start = end
    return windows


def splice_delays(windows: Sequence[HeldWindow], make_tracker: Callable[[], FaceStateTracker], *,
                  lead_s: float = 3.0, horizon_s: float = 3.0) -> tuple[list[float], int]:
    """Delays from a splice to its event: for each held window B and every held window A of another
    emotion, one face shows A's frames (up to lead_s of them) then B's (up to horizon_s); the delay
    is from B's first frame to the EmotionChanged to B's emotion. Real classifier noise on both sides
    of a step whose time is known. Pairs where B's emotion is already emitted before the step are
    skipped. Returns (delays, missed).

    Every pair, not one A per emotion: with one, the count was a handful of windows times the
    number of emotions seen, so a rare emotion's single window appearing or not (after a change
    of a fraction of a grey level in the detector's input) moved it by a third."""
    delays, missed = [], 0
    box = Box(100.0, 100.0, 80.0, 80.0)
    for b in windows:
        for a in (a for a in windows if a.label != b.label):
            # At their own timestamps, B's first frame at 0 and A's last one frame interval before.
            b0, a1 = b.after[0][0], a.before[-1][0]
            step = b.after[1][0] - b0
            frames = ([(t - a1 - step, s) for t, s in a.before if t >= a1 - lead_s]
                      + [(t - b0, s) for t, s in b.after if t - b0 <= horizon_s])
            tracker = make_tracker()
            state, delay = UNCERTAIN, None
            for now, scores in frames:
                faces, events = tracker.update(now, [FaceObservation(Detection(box, 1.0), scores)])
                if now < 0:
                    state = faces[0].emotion
                elif any(isinstance(e, EmotionChanged) and e.face.emotion == b.label for e in events):
                    delay = now
                    break
            if state == b.label:
                continue  # B's emotion was already emitted: no change to time
            if delay is None:
                missed += 1
            else:
                delays.append(delay)
    return delays, missed


def _holds(samples: list[tuple[float, str, str]], k: int, hold_s: float, frame_interval: float) -> bool:
    """Whether the label at k stays the same in every frame the face is seen for hold_s."""
    t0, label, _ = samples[k]
    for t, other, _ in samples[k:]:
        if other != label:
            return False
        if t - t0 >= hold_s - frame_interval / 2:
            return True
    return False  # the face left before the hold was over


def add_sensor_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`image` with each value moved by -1, 0 or +1 grey level: below what a camera's own noise
    does to a frame, so a measure that swings with it is measuring chance."""
    noise = rng.integers(-1, 2, image.shape, dtype=np.int16)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def observe_video(path: str, detector, classifier, *, detect_interval_s: float = 0.0,
                  max_frames: int | None = None, noise_seed: int | None = None) -> tuple[Observed, float]:
    """Every frame's observations, stamped index / fps; and the frame interval. As the daemon does,
    the detector runs at most every `detect_interval_s` and the classifier on every frame, at the
    boxes found last. With `noise_seed`, each frame first gets `add_sensor_noise` from that seed."""
    from agent.capture import VideoFileSource

    source = VideoFileSource(path)
    rng = None if noise_seed is None else np.random.default_rng(noise_seed)
    observed: Observed = []
    detections, last_detect = [], -math.inf
    total = frames_total(source.frame_count, max_frames)
    progress = Progress(Path(path).name, total)
    try:
        while max_frames is None or len(observed) < max_frames:
            frame = source.read()
            if frame is None:
                break
            progress.update()
            image = frame.image if rng is None else add_sensor_noise(frame.image, rng)
            if frame.timestamp - last_detect >= detect_interval_s - 1e-3:
                detections, last_detect = detector.detect(image), frame.timestamp
            scores = (classifier.classify(image, [d.box for d in detections], [d.roll for d in detections])
                      if detections else [])
            observed.append((frame.timestamp, [FaceObservation(d, s) for d, s in zip(detections, scores)]))
    finally:
        source.close()
        progress.close()
    return observed, 1.0 / source.fps


def format_figures(name: str, f: FlickerFigures) -> str:
    delays = (f"median {statistics.median(f.delays):.2f} s, max {max(f.delays):.2f} s" if f.delays else "none")
    return (f"{name}: {f.frames} frames, {f.tracks} faces, {f.face_seconds:.1f} face-s\n"
            f"  raw label changes     {f.raw_changes:5d}  ({f.per_minute(f.raw_changes):6.1f}/face-min)\n"
            f"  emitted changes       {f.emitted_changes:5d}  ({f.per_minute(f.emitted_changes):6.1f}/face-min), "
            f"ratio {f.ratio:.3f}; first-known {f.first_known}\n"
            f"  held >= 1 s changes   {f.held_changes:5d}  got their event: {len(f.delays)} ({delays}); "
            f"missed {f.missed}")


def format_splices(windows: Sequence[HeldWindow], delays: Sequence[float], missed: int) -> str:
    labels = ", ".join(f"{label} {n}" for label, n in sorted(Counter(w.label for w in windows).items()))
    if not delays:
        return f"spliced held windows ({labels}): no pairs timed, missed {missed}"
    return (f"spliced held windows ({labels}): {len(delays) + missed} steps, event after median "
            f"{statistics.median(delays):.2f} s, p90 {_p90(delays):.2f} s, max {max(delays):.2f} s; missed {missed}")


@dataclass
class RunFigures:
    """One pass over the videos: the per-frame figures summed, the held windows, the splices, and
    each video's emitted states (for `agreement`)."""
    figures: FlickerFigures
    windows: list[HeldWindow]
    delays: list[float]
    missed: int
    states: list[FrameStates] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.delays) + self.missed


def measure_videos(videos: Sequence[str], cfg, detector, classifier, *, every: int = 1, hold_s: float = 1.0,
                   horizon_s: float = 3.0, max_frames: int | None = None, noise_seed: int | None = None,
                   report: Callable[[str], None] | None = None) -> RunFigures:
    """The figures for `videos` under `cfg`'s tracker, each video's passed to `report` if given."""
    from agent.pipeline import make_tracker_from

    total, windows, states = FlickerFigures(), [], []
    for video in videos:
        observed, interval = observe_video(video, detector, classifier, detect_interval_s=cfg.detector.interval_s,
                                           max_frames=max_frames, noise_seed=noise_seed)
        observed, interval = observed[::every], interval * every
        sequences, events = face_sequences(observed, make_tracker_from(cfg))  # one tracker pass for both
        figures = figures_of(sequences, events, frames=len(observed), frame_interval=interval, hold_s=hold_s,
                             horizon_s=horizon_s)
        if report is not None:
            report(format_figures(video, figures))
        total.add(figures)
        windows += held_windows(sequences, frame_interval=interval, hold_s=hold_s)
        states.append(frame_states(sequences))
    delays, missed = splice_delays(windows, lambda: make_tracker_from(cfg), horizon_s=horizon_s)
    return RunFigures(total, windows, delays, missed, states)


def frame_states(sequences: Sequences) -> FrameStates:
    """Each frame's faces, by timestamp: (box, emitted emotion) of those seen in it."""
    states: FrameStates = {}
    for faces in sequences.values():
        for t, face in faces:
            states.setdefault(t, []).append((face.box, face.emotion))
    return states


@dataclass
class Agreement:
    face_frames: int = 0   # the reference's faces with a known emotion, summed over frames
    found: int = 0         # ... with a face of the candidate's on them (IoU >= min_iou)
    agreed: int = 0        # ... emitting the same emotion

    def add(self, other: Agreement) -> None:
        self.face_frames += other.face_frames
        self.found += other.found
        self.agreed += other.agreed


def agreement(reference: FrameStates, candidate: FrameStates, min_iou: float = 0.3) -> Agreement:
    """How often the candidate emits what the reference emits, frame by frame and face by face
    (each reference face against the candidate's face overlapping it most). Frames where the
    reference is still uncertain about a face are not counted. Pure."""
    result = Agreement()
    for t, faces in reference.items():
        theirs = candidate.get(t, [])
        for box, emotion in faces:
            if emotion == UNCERTAIN:
                continue
            result.face_frames += 1
            overlap, other = max(((box.iou(b), e) for b, e in theirs), default=(0.0, None), key=lambda x: x[0])
            if overlap >= min_iou:
                result.found += 1
                result.agreed += other == emotion
    return result


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


@dataclass(frozen=True)
class Pooled:
    """Several runs' figures as one sample: what a change must be judged against."""
    figures: FlickerFigures        # the per-frame figures, summed over the runs
    delays: tuple[float, ...]      # every run's spliced steps' delays, sorted
    missed: int

    @classmethod
    def of(cls, runs: Sequence[RunFigures]) -> Pooled:
        figures = FlickerFigures()
        for run in runs:
            figures.add(run.figures)
        return cls(figures, tuple(sorted(d for r in runs for d in r.delays)), sum(r.missed for r in runs))

    @property
    def steps(self) -> int:
        return len(self.delays) + self.missed

    @property
    def p90(self) -> float:
        return _p90(self.delays) if self.delays else 0.0

    @property
    def missed_share(self) -> float:
        return self.missed / self.steps if self.steps else 0.0


def format_pooled(runs: Sequence[RunFigures]) -> str:
    """The runs' figures pooled, with each run's spread."""
    pooled = Pooled.of(runs)
    f, delays = pooled.figures, pooled.delays
    per_run = ", ".join(f"{r.steps}/{r.missed}/{max(r.delays, default=0.0):.2f}" for r in runs)
    timing = (f"event after median {statistics.median(delays):.2f} s, p90 {pooled.p90:.2f} s, "
              f"max {delays[-1]:.2f} s" if delays else "no step timed")
    return (f"pooled over {len(runs)} runs: emitted changes {f.per_minute(f.emitted_changes):.1f} "
            f"against raw {f.per_minute(f.raw_changes):.1f} per face-min (ratio {f.ratio:.3f}); "
            f"spliced steps {pooled.steps}, missed {pooled.missed} ({pooled.missed_share:.1%}), {timing}\n"
            f"  per run, steps/missed/max delay: {per_run}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return flushed(_main(argv))
    except (KeyboardInterrupt, Exception) as exc:  # one line and the exit code the emotion-agent command gives
        if not interrupted(exc):
            return report_error(exc)
    print("interrupted", file=sys.stderr)  # Ctrl-C: the reports printed so far stand, and no traceback
    return 130


def _main(argv: Sequence[str] | None) -> int:
    from agent.argtypes import Parser, non_negative_int, positive_float, positive_int
    from agent.config import load_config

    p = Parser(prog="python -m agent.tools.flicker", description=__doc__.splitlines()[0])
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    p.add_argument("--config", metavar="FILE", help="agent config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, the value read as in the YAML config, e.g. smoothing.dwell_s=0.5, "
                        "detector.threads=2, classifier.model=null (repeatable)")
    p.add_argument("--every", type=positive_int, default=1, metavar="N",
                   help="keep every Nth frame, at its own timestamp (a slower camera)")
    p.add_argument("--noise-runs", type=non_negative_int, default=0, metavar="N",
                   help="also run N times with +-1 grey level of seeded noise on every frame, and pool")
    p.add_argument("--agreement", action="store_true",
                   help="compare the emitted emotions, frame by frame, with the built-in defaults run with the "
                        "detector on every frame (each noise run with the same noise)")
    p.add_argument("--hold-s", type=positive_float, default=1.0, help="how long a raw change must hold to be timed")
    p.add_argument("--horizon-s", type=positive_float, default=3.0,
                   help="longest delay that still counts as a hit")
    p.add_argument("--max-frames", type=positive_int, metavar="N")
    args = p.parse_args(argv)
    # INFO for agent.tools.progress's periodic lines when stderr is not a terminal; the rest stays quiet.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent.tools.progress").setLevel(logging.INFO)
    cfg = load_config(args.config, dict(parse_setting(item) for item in args.set))
    from agent.capture import check_video_file

    for video in args.videos:  # every one, before minutes of measuring the first
        check_video_file(video, "flicker")
    return _run(args, cfg)


def parse_setting(item: str) -> tuple[str, object]:
    """`KEY=VALUE` from --set, the value read as the same text in the YAML config would be: 2 an
    integer, true a boolean, null none, 0.5 a number, anything else a string."""
    import yaml

    key, equals, text = item.partition("=")
    if not equals or not key.strip() or not text.strip():
        raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
            raise ConfigError(f"--set {key}: YAML aliases are not supported; write the value out")
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {key}: invalid value {text!r}: {problem}") from None


def _run(args: argparse.Namespace, cfg) -> int:
    from agent.config import load_config
    from agent.classify import make_classifier
    from agent.detect import make_detector

    s = cfg.smoothing
    print(f"smoothing: window_s={s.window_s} change_margin={s.change_margin} dwell_s={s.dwell_s} "
          f"confidence_gate={s.confidence_gate}; tracking: max_gap_s={cfg.tracking.max_gap_s}; "
          f"detector every {cfg.detector.interval_s} s; every {args.every} frame(s)")
    detector, classifier = make_detector(cfg.detector), make_classifier(cfg.classifier)
    options = dict(every=args.every, hold_s=args.hold_s, horizon_s=args.horizon_s, max_frames=args.max_frames)
    plain = measure_videos(args.videos, cfg, detector, classifier, report=print, **options)
    if len(args.videos) > 1:
        print(format_figures("all", plain.figures))
    print(format_splices(plain.windows, plain.delays, plain.missed))
    runs = [plain]
    for seed in range(1, args.noise_runs + 1):
        run = measure_videos(args.videos, cfg, detector, classifier, noise_seed=seed, **options)
        print(f"noise seed {seed}: emitted {run.figures.per_minute(run.figures.emitted_changes):.1f} "
              f"per face-min (ratio {run.figures.ratio:.3f}); " + format_splices(run.windows, run.delays, run.missed))
        runs.append(run)
    if args.noise_runs:
        print(format_pooled(runs))
    if args.agreement:
        # The reference: the built-in defaults with the detector on every frame, whatever --config says.
        reference_cfg = load_config(None, {"detector.interval_s": 0})
        reference_detector = make_detector(reference_cfg.detector)
        reference_classifier = make_classifier(reference_cfg.classifier)
        total = Agreement()
        for seed, run in zip([None, *range(1, args.noise_runs + 1)], runs):
            reference = measure_videos(args.videos, reference_cfg, reference_detector, reference_classifier,
                                       noise_seed=seed, **options)
            for theirs, ours in zip(reference.states, run.states):
                total.add(agreement(theirs, ours))
        print(format_agreement(total, len(runs)))
    return 0


def format_agreement(a: Agreement, runs: int) -> str:
    share = (lambda n: n / a.face_frames) if a.face_frames else (lambda n: 0.0)
    return (f"agreement with the reference (built-in defaults, detector on every frame), over {runs} run(s): "
            f"the same emotion in {share(a.agreed):.1%} of {a.face_frames} face-frames with a known emotion; "
            f"the face found in {share(a.found):.1%}")


if __name__ == "__main__":
    sys.exit(main())
