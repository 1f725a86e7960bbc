"""make ensemble: runs' probabilities blended with weights chosen on their shared held-out rows."""

import json

import numpy as np
import pandas as pd
import pytest

from vqa.cli import run_stage
from vqa.config import load_config
from vqa.data import LETTERS
from vqa.blending import coordinate_ascent, simplex_grid
from vqa.ensemble import ensemble
from vqa.options import argmax_letter, write_probabilities
from vqa.submission import SubmissionError

TEST_IDS = [f"t{n}" for n in range(30)]
HELD_IDS = [f"v{n}" for n in range(80)]


def normalised(values) -> list[float]:
    """Six-decimal probabilities that sum to exactly 1, as make submit writes them."""
    values = np.asarray(values, float) / np.sum(values)
    rounded = [round(float(v), 6) for v in values[:-1]]
    return [*rounded, round(1 - sum(rounded), 6)]


def random_probs(ids, seed) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {i: normalised(rng.dirichlet(np.ones(4))) for i in ids}


def peaked(letter_index: int, top: float) -> list[float]:
    rest = (1 - top) / 3
    return normalised([top if j == letter_index else rest for j in range(4)])


def truth_for(ids, seed=7) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {i: LETTERS[int(rng.integers(4))] for i in ids}


def make_data(root) -> object:
    data = root / "data"
    data.mkdir()
    pd.DataFrame({"id": TEST_IDS, "path": [f"images/{i}.png" for i in TEST_IDS],
                  "question": "what color?", "a": "red", "b": "blue", "c": "green",
                  "d": "black"}).to_csv(data / "test.csv", index=False)
    return data


def write_run(folder, test_probs, held_out=None, truth=None,
              source="validation_probabilities.csv"):
    """A run folder as make submit (and make eval / make train FOLDS=K) leave it."""
    folder.mkdir(parents=True)
    answers = {i: argmax_letter(p) if p else "a" for i, p in test_probs.items()}
    write_probabilities(folder / "probabilities.csv", list(test_probs), answers,
                        {i: p for i, p in test_probs.items() if p})
    if held_out is not None:
        frame = write_probabilities(folder / source, list(held_out),
                                    {i: argmax_letter(p) for i, p in held_out.items()},
                                    held_out, truth)
        if source == "oof_probabilities.csv":
            frame["fold"] = [n % 2 for n in range(len(frame))]
            frame.to_csv(folder / source, index=False)
    return folder


def config_for(data, out, runs):
    return load_config([f"DATA_DIR={data}", f"ARTIFACTS_DIR={out}",
                        "RUNS=" + ",".join(str(r) for r in runs)], environ={})


def read_probs(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str}, keep_default_na=False).set_index("id")


def accurate_run(folder, truth, seed=1, top=0.7):
    held = {i: peaked(LETTERS.index(t), top) for i, t in truth.items()}
    return write_run(folder, random_probs(TEST_IDS, seed), held, truth)


def random_run(folder, truth, seed=2):
    return write_run(folder, random_probs(TEST_IDS, seed), random_probs(truth, seed + 100),
                     truth)


def test_an_ensemble_of_one_run_is_that_run(tmp_path, capsys):
    data, truth = make_data(tmp_path), truth_for(HELD_IDS)
    run = accurate_run(tmp_path / "run1", truth)
    report = ensemble(config_for(data, tmp_path / "out", [run]))
    mine = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    theirs = read_probs(run / "probabilities.csv")
    assert list(mine["id"]) == TEST_IDS
    assert list(mine["answer"]) == list(theirs.loc[TEST_IDS, "answer"])
    blended = read_probs(tmp_path / "out" / "probabilities.csv")
    columns = [f"p_{x}" for x in LETTERS]
    assert np.abs(blended.loc[TEST_IDS, columns].to_numpy()
                  - theirs.loc[TEST_IDS, columns].to_numpy()).max() <= 1e-6
    assert report["weights"] == {str(run): 1.0}
    assert report["answers_changed_vs_best_single"] == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"vqa ensemble: wrote {tmp_path / 'out' / 'submission.csv'} (30 rows")


def test_weights_go_to_the_accurate_run(tmp_path):
    data, truth = make_data(tmp_path), truth_for(HELD_IDS)
    good = accurate_run(tmp_path / "good", truth)
    noise = random_run(tmp_path / "noise", truth)
    out = tmp_path / "out"
    report = ensemble(config_for(data, out, [noise, good]))
    assert report["weights"][str(good)] >= 0.9
    assert report["shared_rows"] == len(HELD_IDS)
    singles = [r["shared_accuracy"] for r in report["runs"]]
    assert report["blend_accuracy_searched"] >= max(singles) == 1.0
    assert report["blend_accuracy_cross_validated"] is not None
    assert report["best_single_run"] == str(good)
    probs = read_probs(out / "probabilities.csv")[[f"p_{x}" for x in LETTERS]]
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    saved = json.loads((out / "ensemble_report.json").read_text())
    for key in ("runs", "shared_rows", "weights", "blend_accuracy_searched",
                "blend_accuracy_equal", "blend_accuracy_cross_validated", "test_rows",
                "answer_counts", "answers_changed_vs_best_single"):
        assert key in saved
    assert saved["test_rows"] == len(TEST_IDS)
    assert sum(saved["answer_counts"].values()) == len(TEST_IDS)
    assert (out / "ensemble.png").stat().st_size > 1000


def complementary(truth, confident_first: bool) -> dict[str, list[float]]:
    """Confidently right on one half of the rows and narrowly wrong on the other."""
    held = {}
    for n, (i, t) in enumerate(truth.items()):
        right = LETTERS.index(t)
        if (n < len(truth) // 2) == confident_first:
            held[i] = peaked(right, 0.85)
        else:
            wrong = (right + 1) % 4
            held[i] = normalised([0.4 if j == wrong else 0.35 if j == right else 0.125
                                  for j in range(4)])
    return held


def test_complementary_runs_blend_better_than_either(tmp_path):
    data, truth = make_data(tmp_path), truth_for(HELD_IDS)
    first = write_run(tmp_path / "first", random_probs(TEST_IDS, 1),
                      complementary(truth, True), truth)
    second = write_run(tmp_path / "second", random_probs(TEST_IDS, 2),
                       complementary(truth, False), truth, source="oof_probabilities.csv")
    report = ensemble(config_for(data, tmp_path / "out", [first, second]))
    singles = [r["shared_accuracy"] for r in report["runs"]]
    assert singles == [0.5, 0.5]
    assert report["blend_accuracy_searched"] == 1.0 > max(singles)
    assert report["blend_accuracy_equal"] == 1.0
    assert report["blend_accuracy_cross_validated"] > max(singles)
    assert [r["held_out_source"] for r in report["runs"]] == ["validation_probabilities.csv",
                                                             "oof_probabilities.csv"]
    # the tie on accuracy and log-probability is broken towards equal weights
    assert list(report["weights"].values()) == [0.5, 0.5]


def test_equal_weights_without_a_held_out_file(tmp_path, caplog):
    data, truth = make_data(tmp_path), truth_for(HELD_IDS)
    good = accurate_run(tmp_path / "good", truth)
    bare = write_run(tmp_path / "bare", random_probs(TEST_IDS, 3))
    with caplog.at_level("INFO", logger="vqa"):
        report = ensemble(config_for(data, tmp_path / "out", [good, bare]))
    assert list(report["weights"].values()) == [0.5, 0.5]
    assert report["weight_method"] == "equal"
    assert str(bare) in report["equal_weights_reason"]
    assert "validation_probabilities.csv" in report["equal_weights_reason"]
    assert report["blend_accuracy_cross_validated"] is None
    assert "equal weights" in caplog.text and str(bare) in caplog.text


def test_equal_weights_with_too_few_shared_rows(tmp_path):
    data, truth = make_data(tmp_path), truth_for(HELD_IDS)
    good = accurate_run(tmp_path / "good", truth)
    few = {i: truth[i] for i in HELD_IDS[:10]}
    other = random_run(tmp_path / "other", few)
    report = ensemble(config_for(data, tmp_path / "out", [good, other]))
    assert report["shared_rows"] == 10
    assert "only 10 held-out row(s)" in report["equal_weights_reason"]
    assert list(report["weights"].values()) == [0.5, 0.5]


def test_many_runs_climb_from_equal_weights(tmp_path):
    truth = truth_for(HELD_IDS)
    labels = np.array([LETTERS.index(truth[i]) for i in HELD_IDS])
    good = np.array([peaked(k, 0.7) for k in labels])
    noise = [np.array(list(random_probs(HELD_IDS, s).values())) for s in range(4)]
    weights = coordinate_ascent(np.stack([*noise, good]), labels)
    assert weights.sum() == pytest.approx(1)
    assert weights[-1] >= 0.8


def test_the_grid_covers_the_simplex():
    grid = simplex_grid(3)
    assert len(grid) == 231  # C(22, 2) points of step 0.05
    assert np.allclose(grid.sum(axis=1), 1) and (grid >= 0).all()
    assert simplex_grid(1).tolist() == [[1.0]]


def one_line_error(tmp_path, runs, out=None):
    data = tmp_path / "data"
    with pytest.raises(SubmissionError) as caught:
        ensemble(config_for(data, out or tmp_path / "out", runs))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_refuses_runs_with_different_test_ids(tmp_path):
    make_data(tmp_path)
    first = write_run(tmp_path / "first", random_probs(TEST_IDS, 1))
    other_ids = [*TEST_IDS[:-1], "stranger"]
    second = write_run(tmp_path / "second", random_probs(other_ids, 2))
    message = one_line_error(tmp_path, [first, second])
    assert str(first) in message and str(second) in message
    assert f"'stranger' only in {second}" in message
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_refuses_test_ids_other_than_test_csv(tmp_path):
    make_data(tmp_path)
    short = write_run(tmp_path / "short", random_probs(TEST_IDS[:-1], 1))
    message = one_line_error(tmp_path, [short])
    assert str(short) in message and "29 vs 30 ids" in message
    assert "'t29' only in test.csv" in message


def test_refuses_a_run_without_probabilities(tmp_path):
    make_data(tmp_path)
    scored = write_run(tmp_path / "scored", random_probs(TEST_IDS, 1))
    generated = write_run(tmp_path / "generated", {i: None for i in TEST_IDS})
    message = one_line_error(tmp_path, [scored, generated])
    assert str(generated) in message and "INFER_MODE=generate" in message
    message = one_line_error(tmp_path, [scored, tmp_path / "missing"])
    assert str(tmp_path / "missing") in message


@pytest.mark.parametrize("damage, expected", [
    (lambda f: f.assign(p_a=f["p_a"] + 0.01), "sum to 1.01"),
    (lambda f: pd.concat([f, f.iloc[:1]]), "duplicate id 't0'"),
])
def test_refuses_damaged_probabilities(tmp_path, damage, expected):
    make_data(tmp_path)
    run = write_run(tmp_path / "run", random_probs(TEST_IDS, 1))
    frame = pd.read_csv(run / "probabilities.csv", dtype={"id": str})
    damage(frame).to_csv(run / "probabilities.csv", index=False)
    message = one_line_error(tmp_path, [run])
    assert str(run) in message and expected in message


def test_refuses_runs_that_disagree_on_the_truth(tmp_path):
    make_data(tmp_path)
    truth = truth_for(HELD_IDS)
    first = accurate_run(tmp_path / "first", truth)
    flipped = dict(truth, v3="a" if truth["v3"] != "a" else "b")
    second = accurate_run(tmp_path / "second", flipped)
    message = one_line_error(tmp_path, [first, second])
    assert "'v3'" in message and str(first) in message and str(second) in message


def test_refuses_to_write_into_one_of_the_runs(tmp_path):
    make_data(tmp_path)
    first = write_run(tmp_path / "first", random_probs(TEST_IDS, 1))
    second = write_run(tmp_path / "second", random_probs(TEST_IDS, 2))
    before = (second / "probabilities.csv").read_text()
    message = one_line_error(tmp_path, [first, second], out=tmp_path / "first" / ".." / "second")
    assert "is one of RUNS" in message
    assert (second / "probabilities.csv").read_text() == before
    assert not (second / "submission.csv").exists()


def test_refuses_empty_runs(tmp_path):
    make_data(tmp_path)
    assert "RUNS is empty" in one_line_error(tmp_path, [])


def test_the_stage_fails_with_one_line_and_exit_code_2(tmp_path, capsys):
    data = make_data(tmp_path)
    generated = write_run(tmp_path / "generated", {i: None for i in TEST_IDS})
    code = run_stage("ensemble", ensemble, [f"DATA_DIR={data}",
                                            f"ARTIFACTS_DIR={tmp_path / 'out'}",
                                            f"RUNS={generated}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("vqa ensemble: error: run ") and "INFER_MODE=generate" in err[0]


def test_the_script_refuses_an_output_among_the_runs_before_writing_anything(tmp_path, capsys):
    """Through the CLI (as make ensemble runs it): the run's own config.json stays as it was."""
    from vqa.ensemble import check_runs

    data = make_data(tmp_path)
    first = write_run(tmp_path / "first", random_probs(TEST_IDS, 1))
    (first / "config.json").write_text('{"MODEL_ID": "mine"}')
    code = run_stage("ensemble", ensemble, [f"DATA_DIR={data}", f"ARTIFACTS_DIR={first}",
                                            f"RUNS={first}"], before=check_runs)
    assert code == 2 and "is one of RUNS" in capsys.readouterr().err
    assert (first / "config.json").read_text() == '{"MODEL_ID": "mine"}'


def test_with_an_answer_key_the_report_scores_each_run_and_the_blend_on_test(tmp_path):
    data, truth = make_data(tmp_path), truth_for(HELD_IDS)
    sure = {i: peaked(n % 4, 0.9) for n, i in enumerate(TEST_IDS)}  # "abcd"[n % 4] every row
    first = write_run(tmp_path / "first", sure, {i: peaked(LETTERS.index(t), 0.7)
                                                 for i, t in truth.items()}, truth)
    second = random_run(tmp_path / "second", truth)
    key = ["abcd"[n % 4] if n < 24 else "abcd"[(n + 1) % 4] for n in range(30)]
    pd.DataFrame({"id": TEST_IDS, "answer": key}).to_csv(data / "test_answers.csv", index=False)
    report = ensemble(config_for(data, tmp_path / "out", [first, second]))
    assert report["test_key"]["rows"] == 30
    assert report["test_key"]["runs"][str(first)] == pytest.approx(24 / 30, abs=1e-4)
    assert report["test_key"]["blend"] == pytest.approx(24 / 30, abs=1e-4)  # all weight: first
