"""crmt-benchmark --jobs N: the independent (method, seed) jobs in parallel processes give the very rows
of the serial run (one torch thread each), and the run says how long it will take after the first job."""

from __future__ import annotations

import json

from crmt_plugin.benchmark import cli

from test_benchmark import tiny, write


def timeless(value):
    """The row without its timings (``*seconds*`` keys, at any depth)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def test_jobs_2_gives_the_rows_of_jobs_1(tmp_path, capsys):
    path = write(tmp_path / "tiny.npz", **tiny())
    common = ["--data", path, "--quick", "--seeds", "0", "1", "--methods", "jt,crmt-jt", "--no-progress",
              "--no-sound", "--batch-size", "8", "--threads", "1"]
    assert cli.main(common + ["--out", str(tmp_path / "serial"), "--jobs", "1"]) == 0
    serial_log = capsys.readouterr().out
    assert cli.main(common + ["--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    parallel_log = capsys.readouterr().out
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    parallel = json.loads((tmp_path / "parallel" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in parallel["rows"]] == [(m, s) for m in ("jt", "crmt-jt") for s in (0, 1)]
    assert [timeless(r) for r in parallel["rows"]] == [timeless(r) for r in serial["rows"]]
    assert parallel["radius"] == serial["radius"]
    for log, workers in ((serial_log, 1), (parallel_log, 2)):
        assert "the whole run will take about" in log and f"4 jobs, {workers} at a time" in log
    for r in parallel["rows"]:
        assert (tmp_path / "parallel" / r["model"]).is_file()
