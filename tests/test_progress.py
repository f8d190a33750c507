"""Progress of the long commands (rank1inv/examples/progress.py): silent outside a command,
one line per stage on a log, a bar redrawn in place on a terminal, the items unchanged."""

import io

from rank1inv.examples import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_silent_outside_a_command(capsys):
    items = [1, 2, 3]
    assert progress.track(items, "runs") is items
    progress.step("nothing")
    out, err = capsys.readouterr()
    assert out == err == ""


def test_log_gets_one_line_per_stage():
    log = io.StringIO()
    with progress.reporting(log):
        progress.step("first")
        assert list(progress.track(range(4), "grid")) == [0, 1, 2, 3]
        progress.step("last")
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in log.getvalue()
    assert lines[0].endswith("] first") and lines[0].startswith("[")
    assert "grid (4 runs) ..." in lines[1] and "grid: 4 runs in" in lines[2]
    assert lines[3].endswith("] last")
    assert all(line.split("]")[0].strip("[ ").endswith("s") for line in lines)  # elapsed time first


def test_terminal_gets_a_bar_redrawn_in_place():
    tty = Terminal()
    with progress.reporting(tty):
        seen = [x for x in progress.track(["a", "b"], "grid")]
    text = tty.getvalue()
    assert seen == ["a", "b"]
    assert "\r\033[K" in text and "| 1/2" in text and "~" in text  # count and time left
    assert text.endswith("\n") and "grid: 2 runs in" in text


def test_an_interrupted_bar_leaves_the_terminal_on_a_new_line():
    tty = Terminal()
    try:
        with progress.reporting(tty):
            for _ in progress.track(range(3), "grid"):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert tty.getvalue().endswith("\n")
    progress.step("after")  # the reporter is gone
    assert "after" not in tty.getvalue()
