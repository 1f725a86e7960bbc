"""TIME_BUDGET (vqa/planning/budget.py): the largest resolution whose predicted train and submit
fit the budget on the card planned for, fewer epochs when even the smallest does not, and the
stages running with what the plan chose."""

import json

import pytest

from vqa.config import ConfigError, load_config, parse_duration
from vqa.planning import budget as time_budget
from vqa.planning.hardware import budget_for
from vqa.planning.rows import RowShape, tokens_from_table
from vqa.planning.shapes import architecture_for
from vqa.planning.timing import card_named

SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"
ARCH, _ = architecture_for(SEVEN_B)
TOKENS = tokens_from_table(SEVEN_B, None, None, "test")
# a competition's mix: phone photos, screenshots and smaller, 400 training and 100 test rows
SIZES = [(4032, 3024), (1920, 1080), (1024, 768), (640, 480)]
TRAIN = [RowShape(f"r{n}", 120, *SIZES[n % 4]) for n in range(400)]
TEST = [RowShape(f"t{n}", 120, *SIZES[n % 4]) for n in range(100)]


@pytest.mark.parametrize("text, seconds", [("6h", 21600), ("30min", 1800), ("1h30min", 5400),
                                           ("90m", 5400), ("2.5h", 9000), ("45s", 45),
                                           ("1 d", 86400)])
def test_budgets_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("settings, message", [
    (["TIME_BUDGET=6 hours-ish"], "TIME_BUDGET='6 hours-ish': expected e.g. 6h, 30min or 1h30min"),
    (["TIME_BUDGET=0h"], "TIME_BUDGET='0h': must be more than no time"),
    (["TIME_BUDGET=2h", "MAX_PIXELS=401408"],
     "TIME_BUDGET=2h chooses MAX_PIXELS: set one of them, not both (MAX_PIXELS=401408)")])
def test_a_bad_budget_is_one_line(settings, message):
    with pytest.raises(ConfigError) as caught:
        load_config(settings, environ={})
    assert str(caught.value) == message


def _choose(card: str, budget: str, *more: str):
    config = load_config([f"TIME_BUDGET={budget}", f"TARGET_GPU={card}", *more], environ={})
    memory = budget_for(config.target_gpu, "", None)
    # 500 rows to submit (TEST, and TRAIN's again): enough that TTA=rotate's 4x submit moves
    # the choice against training's time
    plan, work = time_budget.choose(config, ARCH, TRAIN, TEST + TRAIN, TOKENS, memory,
                                    card_named(card))
    return plan, work, plan.time_budget


def test_candidates_start_at_the_processors_bound_and_step_down_to_64_tokens():
    pixels = time_budget.candidates(TOKENS, TRAIN)
    assert pixels[0] == TOKENS.max_pixels
    assert pixels == sorted(pixels, reverse=True) and len(set(pixels)) == len(pixels)
    assert pixels[-1] == 64 * TOKENS.pixels_per_token


@pytest.mark.parametrize("card", ["A10G", "L4", "H100-80GB"])
def test_the_largest_resolution_that_fits_the_budget_is_chosen(card):
    plan, work, table = _choose(card, "6h")
    rows = table["rows"]
    chosen = next(i for i, r in enumerate(rows) if r["max_pixels"] == plan.max_pixels)
    assert rows[chosen]["fits_memory"] and rows[chosen]["total_s"] <= 6 * 3600
    # every larger candidate is over memory or over the budget
    assert all(not r["fits_memory"] or r["total_s"] > 6 * 3600 for r in rows[:chosen])
    assert plan.epochs is None and not table["note"]
    # the plan's workload is measured at the chosen bound
    assert max(work.train_visual) == rows[chosen]["visual_max"]
    # time grows with the resolution, and so does the memory of prediction
    totals = [r["total_s"] for r in rows]
    assert totals == sorted(totals, reverse=True)


def test_a_faster_card_or_a_longer_budget_affords_a_larger_resolution():
    a10g = _choose("A10G", "6h")[0].max_pixels
    assert _choose("H100-80GB", "6h")[0].max_pixels > a10g
    assert _choose("A10G", "48h")[0].max_pixels > a10g
    assert _choose("A10G", "6h", "TTA=rotate")[0].max_pixels < a10g  # 4x the submit


def test_fewer_epochs_when_even_the_smallest_resolution_is_too_slow_and_blocked_below_one():
    plan, _, table = _choose("T4", "1000h")
    smallest = table["rows"][-1]
    one_epoch = smallest["epoch_s"] + smallest["submit_s"]
    budget = f"{(one_epoch + smallest['epoch_s'] / 2) / 60:.0f}min"  # one epoch and a half
    plan, _, table = _choose("T4", budget)
    assert plan.max_pixels == smallest["max_pixels"] and plan.epochs == 1
    assert f"EPOCHS=1 fits TIME_BUDGET={budget}" in table["note"] and not table["blocking"]
    plan, _, table = _choose("T4", "1min")
    assert table["blocking"].startswith("TIME_BUDGET=1min: even MAX_PIXELS=")
    assert "raise the budget or plan for a faster card" in table["blocking"]


def test_preflight_prints_the_trade_and_train_runs_at_the_chosen_resolution(tiny_model_dir,
                                                                            tmp_path, capsys):
    from vqa.planning.runplan import PLAN_FILE
    from vqa.preflight import run_preflight
    from vqa.realsize import write_synthetic_data
    from vqa.train import train

    data = write_synthetic_data(tmp_path / "data", 8, 4, (448, 448))
    base = [f"DATA_DIR={data}", f"MODEL_ID={tiny_model_dir}", "TARGET_GPU=A10G", "EPOCHS=1",
            "VAL_FRACTION=0.25", "QUANT=none", "EFFECTIVE_BATCH_SIZE=2"]
    # the whole trade at a budget every candidate fits: the processor's own bound is chosen
    roomy = tmp_path / "roomy"
    assert run_preflight(load_config([*base, f"ARTIFACTS_DIR={roomy}", "TIME_BUDGET=1000h"],
                                     environ={})) == 0
    out = capsys.readouterr().out
    assert "TIME_BUDGET=1000h" in out and "| MAX_PIXELS | visual tokens median / max |" in out
    rows = json.loads((roomy / PLAN_FILE).read_text())["plan"]["time_budget"]["rows"]
    assert len(rows) >= 2 and "## Resolution against time" in (roomy / "preflight.md").read_text()
    # a budget between the two largest candidates' predicted times: the second is chosen
    between = (rows[0]["total_s"] + rows[1]["total_s"]) / 2
    config = load_config([*base, f"ARTIFACTS_DIR={tmp_path / 'run'}",
                          f"TIME_BUDGET={between:.6f}s"], environ={})
    assert run_preflight(config) == 0
    saved = json.loads((tmp_path / "run" / PLAN_FILE).read_text())["plan"]
    assert saved["max_pixels"] == rows[1]["max_pixels"] < rows[0]["max_pixels"]
    metrics = train(config)  # reads the plan preflight saved
    assert metrics["max_pixels"] == rows[1]["max_pixels"] and metrics["epochs"] == 1


def test_preflight_without_a_budget_shows_the_trade_it_would_choose_from(tmp_path, capsys,
                                                                        monkeypatch):
    from vqa.preflight import run_preflight
    from vqa.realsize import write_synthetic_data

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the hub unreachable at once
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    data = write_synthetic_data(tmp_path / "data", 40, 8, SIZES, images=4)
    config = load_config([f"DATA_DIR={data}", f"MODEL_ID={SEVEN_B}", "TARGET_GPU=A10G",
                          f"ARTIFACTS_DIR={tmp_path / 'out'}"], environ={})
    run_preflight(config)  # the processor's max_pixels does not fit an A10G here: blocked
    out = capsys.readouterr().out
    assert ("resolution against time on A10G (TIME_BUDGET=6h or 30min picks from it): this run "
            "is MAX_PIXELS=12845056") in out
    table = [line for line in out.splitlines() if line.startswith("  | 12,845,056 |")]
    assert len(table) == 1 and table[0].endswith("| this run |")
    assert "over budget" not in out  # no budget to be over
    assert "## Resolution against time" in (tmp_path / "out" / "preflight.md").read_text()
