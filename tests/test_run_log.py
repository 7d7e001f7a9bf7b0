"""The run's log (`runlog.RunLog`, `<run_dir>/log.txt`) and the metrics rows a fresh start drops."""
import logging
import sys

from reft_jax.metrics import MetricsWriter, read_metrics
from reft_jax.runlog import RunLog, describe_error


def test_log_tees_both_streams_from_when_the_run_dir_exists(tmp_path, capsys):
    run_dir = tmp_path / "run"
    before = sys.stdout, sys.stderr
    with RunLog(run_dir, "reft sft --config x.yaml") as log:
        print("before the run dir")
        assert log.open() is None and not run_dir.exists()
        run_dir.mkdir()
        print("out", flush=True)
        print("err", file=sys.stderr)
        sys.stderr.write("bar:  0%\rbar: 50%\rbar: 100%")  # a progress bar: only its last state
        print("tail without newline", end="")
        log.detail("only in the log")
        assert log.open() == run_dir / "log.txt"
    assert (sys.stdout, sys.stderr) == before
    shown = capsys.readouterr()
    assert shown.out == "before the run dir\nout\ntail without newline"
    assert shown.err == "err\nbar:  0%\rbar: 50%\rbar: 100%"
    lines = (run_dir / "log.txt").read_text().splitlines()
    assert lines[0].startswith("=== ") and lines[0].endswith(" reft sft --config x.yaml ===")
    assert lines[1:] == ["before the run dir", "out", "err", "only in the log", "tail without newline", "bar: 100%"]


def test_log_appends_takes_logging_handlers_and_records_an_escaping_error(tmp_path, capsys):
    handler = logging.StreamHandler(sys.stderr)  # made before the log: it holds the real stream
    logger = logging.getLogger("reft-test-run-log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        (tmp_path / "log.txt").write_text("an earlier run\n")
        try:
            with RunLog(tmp_path, "second"):
                logger.warning("a warning")
                raise ValueError("boom")
        except ValueError:
            pass
        assert handler.stream is sys.stderr  # given back
    finally:
        logger.removeHandler(handler)
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith("an earlier run\n=== ") and "second ===\na warning\n" in text
    assert "Traceback (most recent call last):" in text and text.endswith("ValueError: boom\n")
    assert capsys.readouterr().err == "a warning\n"


def test_no_log_without_a_usable_run_dir(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for run_dir in (None, afile, afile / "run"):
        with RunLog(run_dir) as log:
            print("hello")
            assert log.open() is None
    assert afile.read_text() == "keep me" and capsys.readouterr().out == "hello\n" * 3


def test_describe_error_keeps_the_context_a_one_line_message_hides():
    try:
        try:
            raise OSError("the real cause")
        except OSError:
            raise ValueError("the one line") from None
    except ValueError as err:
        text = describe_error(err)
    assert text.index("OSError: the real cause") < text.index("ValueError: the one line")


def test_a_fresh_start_drops_the_rows_of_an_attempt_without_a_checkpoint(tmp_path):
    with MetricsWriter(tmp_path) as w:  # an attempt stopped before its first checkpoint
        w.write(0, {"accuracy": 0.5}, prefix="eval")
        w.write(1, {"loss": 1.0}, prefix="train")
    with MetricsWriter(tmp_path, resume_step=-1) as w:  # opened again, no checkpoint: starts over
        assert read_metrics(tmp_path / "metrics.jsonl") == []
        w.write(0, {"accuracy": 0.25}, prefix="eval")
        w.write(1, {"loss": 2.0}, prefix="train")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("eval/accuracy", r.get("train/loss"))) for r in rows] == [(0, 0.25), (1, 2.0)]
