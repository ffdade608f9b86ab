"""`distill quickstart`: the seed-spread verdict, the report, and the whole pipeline on the tiny 'smoke' preset."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from distillery.report import (
    Row, curve, detection_terms, draw_detections, format_table, read_loss_history, svg_line_chart, verdict, write_report,
)


def _row(label, losses, aps):
    return Row(label, losses, tuple(range(len(aps))), tuple({"AP": a, "AP50": a + 10, "AP75": a - 1} for a in aps))


def test_verdict_is_a_gain_only_beyond_the_seed_spread():
    # Baseline range 1.0, row range 0.4: a +1.5 difference exceeds the spread.
    gain = verdict([10.0, 11.0], [12.3, 12.7])
    assert gain.word == "gain" and gain.delta == pytest.approx(2.0) and gain.spread == pytest.approx(1.0)
    # +0.6 is inside the baseline's 1.0 range.
    assert verdict([10.0, 11.0], [11.0, 11.2]).word == "within noise"
    # Exactly the spread is not beyond it.
    assert verdict([10.0, 11.0], [11.0, 11.0]).word == "within noise"
    assert verdict([10.0, 11.0], [8.0, 8.4]).word == "loss"
    # The row's own spread counts too: +1.0 against a row range of 3.0.
    assert verdict([10.0, 10.2], [9.6, 12.6]).word == "within noise"
    single = verdict([10.0], [14.0])
    assert single.spread is None and single.word == "one seed: not judged"
    with pytest.raises(ValueError, match="at least one value"):
        verdict([], [1.0])


def test_table_prints_seeds_spread_and_verdicts_from_the_given_numbers():
    rows = [
        Row("teacher gfl_r18", "teacher", (), ({"AP": 40.0, "AP50": 60.0, "AP75": 42.0},)),
        _row("gfl_tiny baseline", "none", [20.0, 21.0]),
        _row("gfl_tiny + LD", "ld", [21.2, 21.4]),
        _row("gfl_tiny + LD + LD_IM", "ld,ld_im", [24.0, 24.6]),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:4] == ["model", "AP", "AP50", "AP75"]
    assert re.search(r"teacher gfl_r18\s+40\.0\s+60\.0\s+42\.0\s*$", lines[1])
    assert "20.5 ± 0.7" in lines[2] and "20.0, 21.0" in lines[2]
    assert "+0.8" in lines[3] and "1.0" in lines[3] and lines[3].endswith("within noise")
    assert "+3.8" in lines[4] and lines[4].endswith("gain")


def test_loss_history_terms_and_curves(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([
        json.dumps({"step": 10, "loss": 3.0, "qfl": 1.0, "dfl": 0.5, "giou": 1.5, "lr": 1e-3, "img_s": 5.0}),
        json.dumps({"step": 20, "loss": 2.0, "qfl": 0.8, "dfl": 0.4, "giou": 0.8, "lr": 1e-3, "img_s": 5.0}),
        json.dumps({"step": 20, "AP": 0.1}),  # an eval line: not a training point
        "not json",
    ]) + "\n")
    history = read_loss_history(path)
    assert [r["step"] for r in history] == [10, 20]
    assert detection_terms(history) == ["dfl", "giou", "qfl"]
    assert curve(history, None) == [(10.0, 3.0), (20.0, 2.0)]
    assert curve(history, ["qfl", "dfl"]) == [(10.0, 1.5), (20.0, pytest.approx(1.2))]
    assert read_loss_history(tmp_path / "missing.jsonl") == []
    svg = svg_line_chart([("baseline", curve(history, None))], "total", "loss")
    assert svg.startswith("<svg") and "<polyline" in svg and "baseline" in svg


def test_report_is_self_contained_with_table_curves_and_images(tmp_path):
    rows = [Row("teacher gfl_r18", "teacher", (), ({"AP": 40.0, "AP50": 60.0, "AP75": 42.0},)),
            _row("gfl_tiny baseline", "none", [20.0, 21.0]), _row("gfl_tiny + LD", "ld", [23.0, 23.5])]
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    drawn = draw_detections(pixels, np.array([[5.0, 20.0, 30.0, 35.0]]), np.array([1]), np.array([0.9]), ["a", "b"], "x")
    assert drawn.size == (60, 56)
    assert np.asarray(drawn)[16 + 35, 5:30].any()  # the box's bottom edge is drawn
    from distillery.report import image_data_uri

    series = [("gfl_tiny baseline", [(10.0, 3.0), (20.0, 2.0)]), ("gfl_tiny + LD", [(10.0, 3.5), (20.0, 2.5)])]
    out = write_report(
        tmp_path / "r" / "report.html", title="t", intro="i", rows=rows,
        curves=[("detection loss", "loss", "note", series)],
        panels=[[("ground truth", image_data_uri(drawn)), ("teacher", image_data_uri(drawn))]],
        timings=[("teacher", "12 s")], summary={"rows": 3},
    )
    page = out.read_text(encoding="utf-8")
    assert page.count("<svg") == 2 and page.count("<polyline") == 2
    assert page.count("data:image/jpeg;base64,") == 2
    assert "gain" in page and "23.2 ± 0.4" in page and "12 s" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere
    assert json.loads(out.with_suffix(".json").read_text()) == {"rows": 3}


def test_easy_variant_has_four_classes_and_large_objects(tmp_path):
    from detcore import synth

    summary = synth.generate(tmp_path / "e", num_train=8, num_val=0, seed=0, progress=False, variant="easy")
    data = json.loads((tmp_path / "e" / "annotations" / "train.json").read_text())
    assert summary["num_classes"] == 4 and len(data["categories"]) == 4
    assert data["info"]["variant"] == "easy"
    assert {a["category_id"] for a in data["annotations"]} <= {c["id"] for c in data["categories"]}
    assert min(max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"]) >= 8
    standard = json.loads(json.dumps(synth._coco_json("val", 0, [], synth.VARIANTS["standard"])))
    assert "variant" not in standard["info"] and len(standard["categories"]) == 12
    with pytest.raises(ValueError, match="variant"):
        synth.generate(tmp_path / "x", num_train=1, num_val=0, variant="hard", progress=False)


@pytest.mark.slow
def test_quickstart_smoke_runs_every_step_and_writes_table_and_report(tmp_path):
    env = dict(os.environ, DISTILLERY_HOME=str(tmp_path), TQDM_DISABLE="1")
    completed = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "quickstart", "--preset", "smoke"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    for step in ("dataset", "teacher", "precompute", "student baseline seed 0", "student baseline seed 1",
                 "student + LD + LD_IM seed 1"):
        assert f"[quickstart] {step}:" in out
    table_rows = [line for line in out.splitlines() if line.startswith(("teacher gfl_tiny", "gfl_tiny baseline", "gfl_tiny + LD"))]
    assert len(table_rows) == 4, out[-2000:]
    assert "2 seed(s) each (0, 1)" in out
    # Every number in the table comes from a file the steps wrote.
    runs = tmp_path / "students" / "smoke-easy"
    seed1 = json.loads((runs / "ld+ld_im-seed1" / "results.json").read_text())["coco"]
    cells = [c for c in re.split(r"\s{2,}", table_rows[3]) if c]
    assert f"{100 * seed1['AP']:.1f}" in cells[4].split(", ")
    report = tmp_path / "reports" / "quickstart-smoke-easy.html"
    assert f"[quickstart] report: {report}" in out
    page = report.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") >= 3 * 5  # 3 val images x (ground truth + teacher + 3 students)
    assert page.count("<polyline") >= 3
    summary = json.loads(report.with_suffix(".json").read_text())
    assert [r["losses"] for r in summary["rows"]] == ["teacher", "none", "ld", "ld,ld_im"]
    # A second run skips every finished step and prints the same table.
    again = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "quickstart", "--preset", "smoke"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 2 + 6
    assert [line for line in again.stdout.splitlines() if line.startswith("gfl_tiny")] == table_rows[1:]


# --- the step runner: students side by side, failures, Ctrl-C --------------------------------

_CHILD = r"""
import signal, sys, time, pathlib
d, name, partner, mode = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def on_signal(signum, frame):
    with open(d / "signals", "a") as f:
        f.write(f"{name} {signal.Signals(signum).name}\n")
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
with open(d / "journal", "a") as f:
    f.write(f"start {name}\n")
(d / f"{name}.started").touch()
if mode == "wait-signal":
    while True:
        signal.pause()
# A barrier: the step ends only once its partner has started, so the two must overlap.
deadline = time.monotonic() + 60
while partner != "-" and not (d / f"{partner}.started").exists():
    if time.monotonic() > deadline:
        sys.exit(9)
    time.sleep(0.05)
with open(d / "journal", "a") as f:
    f.write(f"end {name}\n")
if mode == "0":
    (d / f"{name}.done").touch()
sys.exit(int(mode))
"""


def _step(tmp_path, name, partner="-", mode="0", log=True):
    from distillery.pipeline import Step

    return Step(name, [sys.executable, "-c", _CHILD, str(tmp_path), name, partner, mode], tmp_path / f"{name}.done",
                log=tmp_path / f"{name}.log" if log else None)


def _most_at_once(journal):
    running = most = 0
    for line in journal.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    return most


def test_steps_named_parallel_run_side_by_side_up_to_jobs_and_others_alone(tmp_path):
    from distillery.pipeline import run_steps

    done = []
    steps = [_step(tmp_path, "first", log=False), _step(tmp_path, "a", "b"), _step(tmp_path, "b", "a"),
             _step(tmp_path, "c", "d"), _step(tmp_path, "d", "c"), _step(tmp_path, "last", log=False)]
    seconds = run_steps(steps, dict(os.environ), jobs=2, parallel=frozenset("abcd"),
                        on_done=lambda name, s: done.append(name))
    assert set(seconds) == {"first", "a", "b", "c", "d", "last"} and all(s is not None for s in seconds.values())
    assert _most_at_once(tmp_path / "journal") == 2
    lines = (tmp_path / "journal").read_text().splitlines()
    assert lines[:2] == ["start first", "end first"] and lines[-2:] == ["start last", "end last"]
    assert done[0] == "first" and done[-1] == "last" and sorted(done[1:5]) == ["a", "b", "c", "d"]
    # A second run skips every step whose marker exists.
    (tmp_path / "journal").unlink()
    assert set(run_steps(steps, dict(os.environ), jobs=2, parallel=frozenset("abcd")).values()) == {None}
    assert not (tmp_path / "journal").exists()


def test_one_job_runs_parallel_steps_one_at_a_time(tmp_path):
    from distillery.pipeline import run_steps

    steps = [_step(tmp_path, name) for name in "abc"]
    run_steps(steps, dict(os.environ), jobs=1, parallel=frozenset("abc"))
    assert _most_at_once(tmp_path / "journal") == 1


def test_a_failed_step_lets_its_neighbour_finish_and_names_itself_its_log_and_command(tmp_path):
    from distillery.pipeline import run_steps

    steps = [_step(tmp_path, "a", "b", mode="1"), _step(tmp_path, "b", "a"), _step(tmp_path, "c")]
    with pytest.raises(SystemExit) as stop:
        run_steps(steps, dict(os.environ), jobs=2, parallel=frozenset("abc"))
    message = str(stop.value.code)
    assert "step 'a' failed with exit code 1" in message and str(tmp_path / "a.log") in message
    assert "re-run it alone with:" in message
    assert (tmp_path / "b.done").exists() and not (tmp_path / "c.started").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_reaches_every_running_step_once_and_the_runner_exits_128_plus_signal(tmp_path, signum):
    from process_signals import stop_group, wait_until

    runner = (
        "import os, sys\n"
        "from detcore.interrupt import Interrupted\n"
        "from distillery.pipeline import Step, run_steps\n"
        f"d = {str(tmp_path)!r}\n"
        "child = sys.argv[1]\n"
        "steps = [Step(n, [sys.executable, '-c', child, d, n, '-', 'wait-signal'], None, log=None) for n in 'abc']\n"
        "try:\n"
        "    run_steps(steps, dict(os.environ), jobs=2, parallel=frozenset('abc'))\n"
        "except Interrupted as stop:\n"
        "    sys.exit(stop.report())\n"
    )
    process = subprocess.Popen([sys.executable, "-c", runner, _CHILD], start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    wait_until(process, lambda: (tmp_path / "a.started").exists() and (tmp_path / "b.started").exists(), 60)
    output, _ = stop_group(process, signum)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, output
    assert f"interrupted by {name}: finished steps are kept" in output
    # The steps run in sessions of their own: each got the one signal the runner passed on.
    assert sorted((tmp_path / "signals").read_text().splitlines()) == [f"a {name}", f"b {name}"]
    assert not (tmp_path / "c.started").exists()
