"""`emotion-agent bench`."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from agent.cli import main
from tests.test_capture import damage_frames, write_video
from tests.test_end_to_end import still_video


def empty_video(path: Path) -> Path:
    """A video OpenCV opens but gets no frame from: the header of a recording stopped at once."""
    cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48)).release()
    return path


def test_bench_reports_every_figure_for_the_agent_and_decode_only(tmp_path, capsys):
    video = still_video(tmp_path / "clip.avi", seconds=3)
    assert main(["bench", str(video), "--no-classic", "--json", "--plot", str(tmp_path / "plots")]) == 0
    report = json.loads(capsys.readouterr().out)
    agent = report["agent"]
    assert agent["frames"] == report["frames_in_video"] == 30
    assert agent["fps"] > 0 and agent["cpu_s_per_frame"] > 0
    assert set(agent["latency_ms"]) == {"decode", "detect", "classify", "track", "publish"}
    for q in agent["latency_ms"].values():
        assert 0 <= q["p50"] <= q["p99"]
    assert report["startup_s"] > 0 and report["peak_rss_mib"] > 10
    assert report["decode_only"]["frames"] == 30
    assert report["ratios"]["agent_vs_decode_only"] == pytest.approx(agent["fps"] / report["decode_only"]["fps"],
                                                                     rel=0.01)
    assert report["events"] >= 3  # appeared, emotion known, lost (twice: the clip has a gap)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["fps_clip.png", "latency_clip.png"]
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["arch"] and "ai-edge-litert" in machine["packages"]


def test_bench_plot_name_replaces_the_video_name(tmp_path, capsys):
    video = still_video(tmp_path / "clip.avi", seconds=1)
    assert main(["bench", str(video), "--no-classic", "--no-decode", "--plot", str(tmp_path / "p"),
                 "--plot-name", "demo"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["fps_demo.png", "latency_demo.png"]


def test_bench_max_frames_stops_early(tmp_path, capsys):
    video = still_video(tmp_path / "clip.avi", seconds=3)
    assert main(["bench", str(video), "--no-classic", "--no-decode", "--max-frames", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agent"]["frames"] == 7


def test_a_damaged_frame_mid_video_is_skipped_by_decode_only_as_by_the_agent(tmp_path, capsys):
    # Decode only stopped at the frame that failed to decode: 12 frames against the agent's 29.
    video = damage_frames(write_video(tmp_path / "clip.avi", frames=30), [12])
    assert main(["bench", str(video), "--no-classic", "--rounds", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["agent"]["frames"] == report["decode_only"]["frames"] == 29


def test_a_damaged_frame_mid_video_is_skipped_by_the_classic_reference(tmp_path):
    pytest.importorskip("tensorflow")
    from agent.tools.bench import bench_classic

    video = damage_frames(write_video(tmp_path / "clip.avi", frames=30), [12])
    assert bench_classic(str(video), None).frames == 29  # it stopped at 12


BAD_BENCH_INPUTS = [
    (["/nonexistent.mp4"], "source not found: /nonexistent.mp4"),
    (["{tmp}"], "source is a directory"),
    (["{photo}"], "bench needs a video file; {photo} is an image"),
    (["rtsp://127.0.0.1:1/x"], "bench needs a video file; rtsp://127.0.0.1:1/x is a stream"),
    (["{video}", "--plot", "{photo}"], "--plot: not a folder"),                # before measuring
    (["{video}", "--plot", "/proc/x"], "--plot: cannot create folder /proc/x"),
    (["{video}", "--plot-name", "a/b"], "expected a name without '/'"),
    (["{empty}"], "video {empty} has no frame that can be decoded"),
    (["{video}", "--plot", "{tmp}/taken"], "--plot: {tmp}/taken/fps_clip.png is a folder, not a file"),
    (["{video}", "--plot", "{tmp}/p", "--plot-name", "n" * 300], "File name too long"),
]


@pytest.mark.parametrize("args, message", BAD_BENCH_INPUTS, ids=[m[:60] for _, m in BAD_BENCH_INPUTS])
def test_bench_bad_input_is_one_line_before_any_measuring(tmp_path, capsys, smiling_photo, args, message):
    video = still_video(tmp_path / "clip.avi", seconds=1)
    (tmp_path / "taken" / "fps_clip.png").mkdir(parents=True)
    names = {"tmp": tmp_path, "photo": smiling_photo, "video": video, "empty": empty_video(tmp_path / "empty.avi")}
    try:
        code = main(["bench", *(a.format(**names) for a in args), "--no-classic"])
    except SystemExit as exit_:  # argparse's own one-line usage error
        code = exit_.code
    captured = capsys.readouterr()
    assert code != 0 and captured.out == ""
    assert message.format(**names) in captured.err and captured.err.count("error:") == 1
    assert "Traceback" not in captured.err


def test_bench_plots_that_cannot_be_saved_are_a_one_line_error(tmp_path):
    pytest.importorskip("matplotlib")
    from agent.tools.bench import BenchResult, PipelineFigures, plot
    from agent.errors import AgentError

    figures = PipelineFigures(frames=10, seconds=0.1, fps=100.0, cpu_s_per_frame=0.01,
                              latency_ms={"detect": {"p50": 1.0, "p99": 2.0}})
    result = BenchResult(video="clip.avi", frames_in_video=10, agent=figures, startup_s=0.5, peak_rss_mib=100.0,
                         events=0)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(AgentError, match=f"^cannot write plot {tmp_path}/file/latency_clip.png: File exists$"):
        plot(result, tmp_path / "file")


def test_bench_without_tensorflow_says_so_before_measuring(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    video = still_video(tmp_path / "clip.avi", seconds=1)
    assert main(["bench", str(video)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs TensorFlow" in err and "--no-classic" in err


def test_bench_rounds_report_each_pipelines_fastest_round(tmp_path, capsys):
    video = still_video(tmp_path / "clip.avi", seconds=1)
    assert main(["bench", str(video), "--no-classic", "--rounds", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rounds"] == 2
    assert len(report["fps_by_round"]["agent"]) == len(report["fps_by_round"]["decode_only"]) == 2
    assert report["agent"]["fps"] == max(report["fps_by_round"]["agent"])
    assert report["decode_only"]["fps"] == max(report["fps_by_round"]["decode_only"])
    # each round's agent against the decode-only run of the same round, not the fastest of all
    rounds = zip(report["fps_by_round"]["agent"], report["fps_by_round"]["decode_only"])
    assert report["ratios_by_round"]["agent_vs_decode_only"] == [pytest.approx(a / d, abs=1e-3) for a, d in rounds]


def test_bench_report_shows_each_rounds_ratio_to_the_classic_pipeline_and_their_median():
    from agent.tools.bench import BenchResult, PipelineFigures, format_report

    def figures(fps: float) -> PipelineFigures:
        return PipelineFigures(frames=100, seconds=100 / fps, fps=fps, cpu_s_per_frame=0.004)

    result = BenchResult(video="clip.mp4", frames_in_video=100, agent=figures(315.4), startup_s=0.5,
                         peak_rss_mib=115.0, events=3, rounds=3, classic=figures(18.6),
                         fps_by_round={"agent": [315.4, 290.0, 280.9], "classic": [18.6, 17.9, 18.1]},
                         ratios={"agent_vs_classic": 16.96},
                         ratios_by_round={"agent_vs_classic": [16.96, 16.2, 15.52]},
                         machine={"cpu": "test CPU", "arch": "x86_64", "cores": 2, "simd": [], "python": "3.11",
                                  "packages": {}})
    lines = format_report(result).splitlines()
    assert lines[-1] == "agent / classic by round: 17.0x, 16.2x, 15.5x (median 16.2x)"
    assert "agent / classic = 17.0x" in lines[-3]


@pytest.mark.parametrize("flag", ["--rounds", "--max-frames"])
def test_bench_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "clip.avi", flag, "0"])
    assert exit_.value.code == 2
    assert "expected a whole number of at least 1, got 0" in capsys.readouterr().err


def test_the_classic_reference_is_the_blogs_published_architecture():
    pytest.importorskip("tensorflow")
    from agent.tools.classic import build_blog_model

    model = build_blog_model()
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "Conv2D", "AveragePooling2D", "Conv2D", "Conv2D",
                     "AveragePooling2D", "Flatten", "Dense", "Dropout", "Dense", "Dropout", "Dense"]
    convs = [(layer.filters, layer.kernel_size) for layer in model.layers if kinds[model.layers.index(layer)] == "Conv2D"]
    assert convs == [(64, (5, 5)), (64, (3, 3)), (64, (3, 3)), (128, (3, 3)), (128, (3, 3))]
    pools = [(layer.pool_size, layer.strides) for layer in model.layers if "Pooling" in type(layer).__name__]
    assert pools == [((5, 5), (2, 2)), ((3, 3), (2, 2)), ((3, 3), (2, 2))]
    assert [layer.units for layer in model.layers if type(layer).__name__ == "Dense"] == [1024, 1024, 7]
    assert [layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"] == [0.2, 0.2]
    assert model.count_params() == 1_485_831


def test_the_up_front_tensorflow_check_does_not_load_it_into_the_measured_process():
    pytest.importorskip("tensorflow")  # in this process only; the check runs in a fresh one
    probe = ("import sys; from agent.tools.classic import check_tensorflow_installed; check_tensorflow_installed(); "
             "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], timeout=120).returncode == 0


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model\t\t: 49
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma f16c avx2 bmi2
"""
PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


@pytest.mark.parametrize("text, model, simd", [
    (X86_CPUINFO, "AMD EPYC", ["avx2", "fma"]),
    (PI5_CPUINFO, "Raspberry Pi 5 Model B Rev 1.0", ["asimd", "asimddp", "asimdhp"]),
    ("", "", []),
])
def test_the_machine_line_names_the_cpu_and_the_extensions_litert_picks_kernels_by(text, model, simd):
    from agent.tools.machine import parse_cpuinfo

    assert parse_cpuinfo(text) == (model, simd)


def test_the_text_report_starts_with_the_machine(tmp_path, capsys):
    video = still_video(tmp_path / "clip.avi", seconds=1)
    assert main(["bench", str(video), "--no-classic", "--no-decode", "--rounds", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("machine: ") and " cores, " in first and "ai-edge-litert" in first
