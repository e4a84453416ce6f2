"""Long runs show progress: a redrawn bar on a terminal, periodic plain log lines elsewhere."""

import io
import logging

from agent.tools.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal():
    stream = FakeTerminal()
    progress = Progress("agent", 10, stream=stream)
    for _ in range(10):
        progress.update()
    progress.close()
    assert "\r" in stream.getvalue() and "10/10 (100%" in stream.getvalue() and "[####" in stream.getvalue()


def test_progress_logs_plain_lines_elsewhere(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="agent.tools.progress"):
        progress = Progress("agent", 4, stream=stream, log_every_s=0)
        for _ in range(4):
            progress.update()
        progress.close()
    assert stream.getvalue() == ""  # no carriage-return bar in a log
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 4 and lines[-1] == lines[-1].strip() and "finished 4/4" in lines[-1]


def test_on_a_terminal_a_bar_is_redrawn_in_place_and_ended_with_a_newline(caplog):
    screen = FakeTerminal()
    progress = Progress("agent", 4, stream=screen)
    for _ in range(4):
        progress.update()
    progress.close()
    text = screen.getvalue()
    last_draw = text.rsplit("\r", 1)[1]
    assert text.startswith("\ragent: [") and last_draw.startswith("agent: [") and "] 4/4 (100%, " in last_draw
    assert text.endswith("/s)\n") and text.count("\n") == 1
    assert not caplog.records


def test_elsewhere_plain_log_lines_at_most_every_interval_and_a_final_one(caplog):
    caplog.set_level(logging.INFO, logger="agent.tools.progress")
    journal = io.StringIO()
    progress = Progress("classify", 3, stream=journal, log_every_s=3600)
    for _ in range(3):
        progress.update()
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert journal.getvalue() == ""
    assert len(lines) == 2  # the first update, then nothing for an hour, then the end
    assert lines[0].startswith("classify: 1/3 (33%") and lines[1].startswith("classify: finished 3/3 (100%")
