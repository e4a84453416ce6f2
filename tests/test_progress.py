"""Long runs show progress: a redrawn bar on a terminal, periodic plain log lines elsewhere."""

import io
import logging

from agent.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_is_redrawn_in_place_and_ended_with_a_newline(caplog):
    screen = Terminal()
    progress = Progress("agent", 4, stream=screen)
    for _ in range(4):
        progress.update()
    progress.close()
    text = screen.getvalue()
    assert text.startswith("\ragent: [") and text.endswith("4/4 (100%, " + text.rsplit("(100%, ", 1)[1])
    assert text.endswith("/s)\n") and text.count("\n") == 1
    assert not caplog.records


def test_elsewhere_plain_log_lines_at_most_every_interval_and_a_final_one(caplog):
    caplog.set_level(logging.INFO, logger="agent.progress")
    journal = io.StringIO()
    progress = Progress("classify", 3, stream=journal, log_every_s=3600)
    for _ in range(3):
        progress.update()
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert journal.getvalue() == ""
    assert len(lines) == 2  # the first update, then nothing for an hour, then the end
    assert lines[0].startswith("classify: 1/3 (33%") and lines[1].startswith("classify: finished 3/3 (100%")
