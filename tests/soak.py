"""Soak: run the real agent for a while at real-time pace on a looping video, against its own
mosquitto, and watch its memory, file descriptors and threads. Not collected by pytest.

    python tests/soak.py --video ../shared/data/videos/hamilton_640x360.mp4 --minutes 10

Samples start once the agent has published its first event (not its first `state`, which comes
before any frame), so the model loading and the broker connection are behind it. Prints one line per sample and a verdict:
resident memory of the last third against the first third (medians) grows less than
--max-growth-mib; descriptors and threads are the same in every sample; messages and frames keep
coming in the last third; SIGTERM ends it with status 0 within 5 s and its last word is `offline`.
Exit status 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import MqttConfig  # noqa: E402
from tests.conftest import Broker, Subscriber  # noqa: E402

PREFIX = "soak/agent"
STOP_WITHIN_S = 5.0


def sample(pid: int) -> dict:
    """Resident memory, threads and open descriptors of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def last_stats(sub: Subscriber) -> dict:
    stats = sub.on_topic(f"{PREFIX}/stats")
    return stats[-1] if stats else {}


def verdict(samples: list[dict], stop_status: int | None, stop_s: float, said_offline: bool,
            max_growth_mib: float) -> dict:
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    rss_first = statistics.median(s["rss_mib"] for s in first)
    rss_last = statistics.median(s["rss_mib"] for s in last)
    fds = sorted({s["fds"] for s in samples})
    threads = sorted({s["threads"] for s in samples})
    # Flowing to the end: the counts rose across the last third (a hung loop would hold them still).
    still_flowing = len(samples) >= 2 and last[-1]["messages"] > samples[-third - 1]["messages"] \
        and last[-1]["frames"] > samples[-third - 1]["frames"]
    checks = {
        "rss_growth_ok": rss_last - rss_first < max_growth_mib,
        "fds_constant": len(fds) == 1,
        "threads_constant": len(threads) == 1,
        "still_flowing": still_flowing,
        "sigterm_exit_0_in_time": stop_status == 0 and stop_s < STOP_WITHIN_S,
        "said_offline": said_offline,
    }
    return {"samples": len(samples), "rss_first_third_mib": round(rss_first, 1),
            "rss_last_third_mib": round(rss_last, 1), "rss_growth_mib": round(rss_last - rss_first, 1),
            "rss_max_mib": max(s["rss_mib"] for s in samples), "fds": fds, "threads": threads,
            "messages": samples[-1]["messages"], "frames": samples[-1]["frames"], "fps": samples[-1]["fps"],
            "sigterm_status": stop_status, "sigterm_s": round(stop_s, 2), **checks, "ok": all(checks.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", required=True, help="video file, played in a loop at its own frame rate")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples (default 10)")
    parser.add_argument("--max-growth-mib", type=float, default=5.0,
                        help="largest accepted growth of the median RSS, first third to last (default 5)")
    parser.add_argument("--json", metavar="FILE", help="write the samples and the verdict here")
    args = parser.parse_args()
    if not Path(args.video).is_file():
        parser.error(f"no such video: {args.video}")
    if not (math.isfinite(args.minutes) and math.isfinite(args.interval)):
        parser.error("--minutes and --interval must be numbers")
    if args.interval <= 0 or args.minutes * 60 < args.interval:
        parser.error("--interval must be above 0 and at most --minutes")
    # The frame count comes with stats, every stats_interval_s: the last third must hold one.
    stats_every = MqttConfig().stats_interval_s
    if args.minutes * 60 / 3 < stats_every + args.interval:
        shortest = 3 * (stats_every + args.interval) / 60
        parser.error(f"--minutes {args.minutes:g} is too short to tell the agent still runs at its end: "
                     f"its last third must hold a stats message (every {stats_every:g} s); at --interval "
                     f"{args.interval:g}, give at least {shortest:g}")

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        sub = Subscriber(broker.port, f"{PREFIX}/#").start()
        command = [sys.executable, "-m", "agent", "run", "--source", args.video, "--loop", "--realtime",
                   "--mqtt-port", str(broker.port), "--topic-prefix", PREFIX, "--log-level", "warning"]
        print("agent:", " ".join(command), flush=True)
        # A file, not a pipe: nobody reads a pipe during the run, and a full one would stall the agent.
        agent_log = Path(tmp) / "agent.log"
        with agent_log.open("wb") as log:
            agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[1])
        samples: list[dict] = []
        stop_status, stop_s = None, 0.0
        try:
            try:
                # Its first event, not its first state: an empty state goes out before any frame,
                # while the pipeline's threads are still starting.
                sub.wait_for(lambda m: m[0].startswith(f"{PREFIX}/event/"), timeout=120)
            except TimeoutError:
                print(f"the agent sent no event in 120 s:\n{agent_log.read_text()[-3000:]}")
                return 1
            started = time.monotonic()
            next_sample = started
            while time.monotonic() - started < args.minutes * 60:
                if agent.poll() is not None:
                    print(f"the agent died with status {agent.returncode}:\n{agent_log.read_text()[-3000:]}")
                    return 1
                stats = last_stats(sub)
                s = {"t_s": round(time.monotonic() - started, 1), **sample(agent.pid), "messages": len(sub.all),
                     "frames": stats.get("frames", 0), "fps": stats.get("fps", 0.0)}
                samples.append(s)
                print(f"t={s['t_s']:7.1f}s rss={s['rss_mib']:7.1f} MiB fds={s['fds']:3d} threads={s['threads']:3d} "
                      f"messages={s['messages']:6d} frames={s['frames']:7d} fps={s['fps']:5.1f}", flush=True)
                next_sample += args.interval
                time.sleep(max(0.0, next_sample - time.monotonic()))
            stopping = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            try:
                stop_status = agent.wait(timeout=STOP_WITHIN_S * 4)
            except subprocess.TimeoutExpired:
                pass
            stop_s = time.monotonic() - stopping
            # A fresh broker holds nothing retained: the only `offline` is the agent's goodbye.
            offline = (f"{PREFIX}/availability", b"offline", True)
            try:
                sub.wait_for(lambda m: m[:2] == offline[:2], timeout=5)
                said_offline = sub.all[-1][:2] == offline[:2]  # and it came last
            except TimeoutError:
                said_offline = False
            problems = [line for line in agent_log.read_text(errors="replace").splitlines()
                        if " WARNING " in line or " ERROR " in line or "Traceback" in line]
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            sub.stop()
            broker.stop()

    result = verdict(samples, stop_status, stop_s, said_offline, args.max_growth_mib)
    result.update(minutes=args.minutes, interval_s=args.interval, video=args.video,
                  agent_warnings=problems[-20:])
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples, "verdict": result}, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
