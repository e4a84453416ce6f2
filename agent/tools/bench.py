"""`emotion-agent bench VIDEO`: the agent's speed on a video file, with two references measured in
the same run: decode only (the ceiling) and the classic blog pipeline (Haar + Keras per face).

Figures: frames/s, per-stage latency p50/p99, CPU seconds per frame, peak memory, and start-up
time to the first processed frame. No broker is involved: messages are built and kept in memory,
so the publish stage measures the agent's own work.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2

from agent.argtypes import check_output_file
from agent.capture import VideoFileSource, check_video_file, opencv_file_name
from agent.config import load_config
from agent.errors import AgentError
from agent.tools.machine import describe, format_machine
from agent.notify import SystemdNotifier
from agent.tools.progress import Progress, frames_total
from agent.stats import STAGES, StageTimes

logger = logging.getLogger(__name__)


@dataclass
class PipelineFigures:
    frames: int
    seconds: float
    fps: float
    cpu_s_per_frame: float
    latency_ms: dict = field(default_factory=dict)


@dataclass
class BenchResult:
    video: str
    frames_in_video: int
    agent: PipelineFigures
    startup_s: float
    peak_rss_mib: float
    events: int
    rounds: int = 1
    fps_by_round: dict = field(default_factory=dict)
    ratios_by_round: dict = field(default_factory=dict)  # each round's agent against that round's reference
    decode_only: PipelineFigures | None = None
    classic: PipelineFigures | None = None
    ratios: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)  # agent.tools.machine.describe(), filled in by run_bench

    def as_dict(self) -> dict:
        return asdict(self)


def _frame_count(video: str) -> int:
    cap = cv2.VideoCapture(opencv_file_name(video))
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return max(count, 0)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _latencies(samples: dict[str, list[float]]) -> dict:
    import numpy as np

    return {stage: {"p50": round(float(np.percentile(v, 50)) * 1000, 3),
                    "p99": round(float(np.percentile(v, 99)) * 1000, 3)}
            for stage, v in samples.items() if v}


def bench_agent(video: str, config_path: str | None, max_frames: int | None) -> tuple[PipelineFigures, int]:
    from agent.mqtt import MemoryPublisher
    from agent.pipeline import build_agent

    cfg = load_config(config_path, {"source": video})
    source = VideoFileSource(video)
    agent = build_agent(cfg, source=source, publisher=MemoryPublisher())
    agent.notifier = SystemdNotifier({})  # silent: a bench run under systemd must not report READY
    agent.times = StageTimes(window=10 ** 7)
    total = frames_total(source.frame_count, max_frames)
    progress = Progress("agent", total)

    def on_frame() -> None:
        progress.update()
        if max_frames and agent.times.frames >= max_frames:
            agent.stop()

    agent.on_frame = on_frame
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = agent.run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    progress.close()
    agent.source.close()
    samples = {s: list(agent.times.samples.get(s, [])) for s in STAGES}
    figures = PipelineFigures(frames=result.frames, seconds=round(wall, 3), fps=round(result.frames / wall, 2),
                              cpu_s_per_frame=round(cpu / max(result.frames, 1), 5), latency_ms=_latencies(samples))
    return figures, result.events


# Run in a fresh interpreter: the time from process start to the first processed frame, imports,
# model loading and opening the video included, as a service start would see it.
_STARTUP_SCRIPT = """
import sys, time
from agent.capture import VideoFileSource
from agent.config import load_config
from agent.mqtt import MemoryPublisher
from agent.notify import SystemdNotifier
from agent.pipeline import build_agent
video, config = sys.argv[1], sys.argv[2] or None
agent = build_agent(load_config(config, {"source": video}), source=VideoFileSource(video), publisher=MemoryPublisher())
agent.notifier = SystemdNotifier({})
agent.on_frame = agent.stop
agent.run()
print(time.time(), flush=True)
agent.source.close()
"""


def measure_startup(video: str, config_path: str | None) -> float:
    """Seconds from launching a new Python process to its first processed frame."""
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, video, config_path or ""],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AgentError(f"start-up measurement failed: {proc.stderr.strip().splitlines()[-1:]}")
    return round(float(proc.stdout.split()[-1]) - launched, 3)


def bench_decode(video: str, max_frames: int | None) -> PipelineFigures:
    # Read as the agent reads (on this thread): a frame that fails to decode mid-video is skipped,
    # not taken for the end, so the references and the agent go through the same frames.
    source = VideoFileSource(video)
    frames = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while not max_frames or frames < max_frames:
        if source.read_here() is None:
            break
        frames += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    source.close()
    return PipelineFigures(frames=frames, seconds=round(wall, 3), fps=round(frames / wall, 2),
                           cpu_s_per_frame=round(cpu / max(frames, 1), 5))


def bench_classic(video: str, max_frames: int | None) -> PipelineFigures:
    from agent.tools.classic import ClassicPipeline

    pipeline = ClassicPipeline()
    source = VideoFileSource(video)
    warm = source.read_here()
    if warm is not None:
        pipeline.model.predict(cv2.resize(cv2.cvtColor(warm.image, cv2.COLOR_BGR2GRAY), (48, 48))[None, :, :, None]
                               / 255.0, verbose=0)  # the first predict builds the graph: not part of steady state
    source.close()
    source = VideoFileSource(video)  # as bench_decode reads: past a damaged frame
    samples: dict[str, list[float]] = {"decode": [], "detect": [], "classify": []}
    total = frames_total(source.frame_count, max_frames)
    progress = Progress("classic", total)
    frames = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while not max_frames or frames < max_frames:
        t = time.perf_counter()
        frame = source.read_here()
        if frame is None:
            break
        samples["decode"].append(time.perf_counter() - t)
        _, detect_s, classify_s = pipeline.process(frame.image)
        samples["detect"].append(detect_s)
        samples["classify"].append(classify_s)
        frames += 1
        progress.update()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    progress.close()
    source.close()
    return PipelineFigures(frames=frames, seconds=round(wall, 3), fps=round(frames / wall, 2),
                           cpu_s_per_frame=round(cpu / max(frames, 1), 5), latency_ms=_latencies(samples))


def _fastest(rounds: list[PipelineFigures]) -> PipelineFigures:
    # The fastest round is the one least disturbed by whatever else the machine was doing.
    return max(rounds, key=lambda f: f.fps)


def run_bench(video: str, *, config_path: str | None = None, max_frames: int | None = None,
              decode: bool = True, classic: bool = True, rounds: int = 3) -> BenchResult:
    """The pipelines take turns, round after round, so a burst of load elsewhere on the machine
    hits them alike; each is reported by its fastest round, and the ratios are between those."""
    check_video_file(video, "bench")
    if classic:
        from agent.tools.classic import check_tensorflow_installed

        check_tensorflow_installed()  # before minutes of measuring, not after
    load_config(config_path, {"source": video})  # a bad config fails now, in one line
    runs: dict[str, list[PipelineFigures]] = {"agent": [], "decode_only": [], "classic": []}
    events, peak_rss = 0, 0.0
    for _ in range(max(1, rounds)):
        figures, events = bench_agent(video, config_path, max_frames)
        runs["agent"].append(figures)
        peak_rss = peak_rss or _peak_rss_mib()  # the agent's own, before TensorFlow is loaded
        if decode:
            runs["decode_only"].append(bench_decode(video, max_frames))
        if classic:
            runs["classic"].append(bench_classic(video, max_frames))
    agent = _fastest(runs["agent"])
    result = BenchResult(video=video, frames_in_video=_frame_count(video), agent=agent,
                         startup_s=measure_startup(video, config_path), peak_rss_mib=round(peak_rss, 1),
                         events=events, rounds=max(1, rounds), machine=describe(),
                         fps_by_round={k: [f.fps for f in v] for k, v in runs.items() if v})
    if decode:
        result.decode_only = _fastest(runs["decode_only"])
        result.ratios["agent_vs_decode_only"] = round(agent.fps / result.decode_only.fps, 3)
        result.ratios_by_round["agent_vs_decode_only"] = _round_ratios(runs["agent"], runs["decode_only"], 3)
    if classic:
        result.classic = _fastest(runs["classic"])
        result.ratios["agent_vs_classic"] = round(agent.fps / result.classic.fps, 2)
        result.ratios_by_round["agent_vs_classic"] = _round_ratios(runs["agent"], runs["classic"], 2)
    return result


def _round_ratios(agent: list[PipelineFigures], reference: list[PipelineFigures], digits: int) -> list[float]:
    # Within a round the two ran back to back, under much the same load: on a noisy machine the
    # spread of these says how far to trust the ratio of the fastest rounds.
    return [round(a.fps / r.fps, digits) for a, r in zip(agent, reference)]


def format_report(r: BenchResult) -> str:
    lines = [format_machine(r.machine)] if r.machine else []
    lines += [f"video: {r.video} ({r.frames_in_video} frames); each pipeline's fastest of {r.rounds} round(s)",
              f"agent: {r.agent.fps:.1f} frames/s over {r.agent.frames} frames, "
              f"{r.agent.cpu_s_per_frame * 1000:.2f} ms CPU/frame, start-up to first frame {r.startup_s:.2f} s, "
              f"peak RSS {r.peak_rss_mib:.0f} MiB, {r.events} events",
              "  stage       p50 ms    p99 ms"]
    for stage, q in r.agent.latency_ms.items():
        lines.append(f"  {stage:<10}{q['p50']:>8.3f}  {q['p99']:>8.3f}")
    if r.decode_only:
        lines.append(f"decode only: {r.decode_only.fps:.1f} frames/s "
                     f"(agent runs at {r.ratios['agent_vs_decode_only']:.0%} of the decode ceiling)")
    if r.classic:
        lines.append(f"classic (Haar + Keras predict per face): {r.classic.fps:.1f} frames/s; "
                     f"agent / classic = {r.ratios['agent_vs_classic']:.1f}x")
    if r.rounds > 1:
        lines.append("frames/s by round: " + "; ".join(
            f"{name} " + ", ".join(f"{v:.1f}" for v in values) for name, values in r.fps_by_round.items()))
        by_round = r.ratios_by_round.get("agent_vs_classic")
        if by_round:
            lines.append("agent / classic by round: " + ", ".join(f"{v:.1f}x" for v in by_round)
                         + f" (median {statistics.median(by_round):.1f}x)")
    return "\n".join(lines)


def plot_paths(video: str, directory: Path, name: str | None = None) -> tuple[Path, Path]:
    """Where `plot` writes: the latency and the frames/s plot."""
    name = name or Path(video).stem
    return directory / f"latency_{name}.png", directory / f"fps_{name}.png"


def plot(r: BenchResult, directory: Path, name: str | None = None) -> list[Path]:
    from agent.tools.eval_emotion import require_pyplot, save_figure

    plt = require_pyplot()
    latency_path, fps_path = plot_paths(r.video, directory, name)
    name = name or Path(r.video).stem
    out = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    stages = list(r.agent.latency_ms)
    xs = range(len(stages))
    ax.bar([x - 0.2 for x in xs], [r.agent.latency_ms[s]["p50"] for s in stages], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r.agent.latency_ms[s]["p99"] for s in stages], 0.4, label="p99")
    ax.set_xticks(list(xs), stages)
    ax.set_ylabel("ms per run of the stage")
    ax.set_title(f"agent latency per stage: {name}")
    ax.legend()
    fig.tight_layout()
    out.append(save_figure(plt, fig, latency_path, dpi=110))
    fig, ax = plt.subplots(figsize=(6, 2.6))
    bars = [("agent", r.agent.fps)]
    if r.decode_only:
        bars.append(("decode only", r.decode_only.fps))
    if r.classic:
        bars.append(("classic", r.classic.fps))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["tab:green", "tab:gray", "tab:red"][:len(bars)])
    for i, (_, v) in enumerate(bars):
        ax.text(v, i, f" {v:.0f}", va="center")
    ax.set_xlabel("frames/s")
    ax.set_title(f"frames/s: {name}")
    fig.tight_layout()
    out.append(save_figure(plt, fig, fps_path, dpi=110))
    return out


def command(args: argparse.Namespace) -> int:
    """`emotion-agent bench`, with the arguments agent.cli declares for it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent.pipeline").setLevel(logging.WARNING)  # one line per event is noise here
    if args.plot:  # before minutes of measuring, not after
        from agent.tools.eval_emotion import check_pyplot_installed

        check_pyplot_installed()
        for path in plot_paths(args.video, Path(args.plot), args.plot_name):
            check_output_file(path, "--plot")
    result = run_bench(args.video, config_path=args.config, max_frames=args.max_frames,
                       decode=not args.no_decode, classic=not args.no_classic, rounds=args.rounds)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_report(result))
    if args.plot:
        for path in plot(result, Path(args.plot), args.plot_name):
            print(f"wrote {path}", file=sys.stderr)
    return 0

