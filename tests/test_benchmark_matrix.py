"""experiments/make_datasets.py and experiments/run_matrix.py end to end on the smallest real data set
(Nutrimouse, 40 mice), two methods, one seed, --quick: the data file, the runs and the pages."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_datasets_and_matrix_pages(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        make = load("make_datasets")
        report = make.main(["--out", str(tmp_path / "data"), "--only", "nutrimouse"])
        assert set(report["nutrimouse"]) == {"gene", "lipid"}
        matrix = load("run_matrix")
        page = tmp_path / "docs" / "results.md"
        page.parent.mkdir()
        matrix.main(["--datasets", "nutrimouse", "--data-dir", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"),
                     "--page", str(page), "--methods", "jt,crmt-jt", "--seeds", "0", "--processes", "1",
                     "--extra", "--quick"])
    finally:
        sys.path.remove(os.path.join(ROOT, "experiments"))
    results = json.loads((tmp_path / "runs" / "nutrimouse" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["jt", "crmt-jt"]
    text = page.read_text()
    assert "Win / loss" in text and "[nutrimouse](results/nutrimouse.md)" in text
    assert "crmt-jt vs jt" in text and ("**win**" in text or "loss:" in text)
    detail = (tmp_path / "docs" / "results" / "nutrimouse.md").read_text()
    assert "| crmt-jt |" in detail
    assert (tmp_path / "docs" / "results" / "nutrimouse.png").stat().st_size > 0
